//! Emulated devices: the I/O bus, the legacy port devices, the virtio devices on the
//! virtio-mmio transport, and the gate that stops the device thread for a snapshot.

pub mod bus;
pub mod gate;
pub mod legacy;
pub mod virtio;
