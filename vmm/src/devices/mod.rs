//! Emulated devices: the I/O bus and the virtio devices on the virtio-mmio transport.

pub mod bus;
pub mod legacy;
pub mod virtio;
