//! virtio-rng device (being written).
