//! virtio-block device (being written).
