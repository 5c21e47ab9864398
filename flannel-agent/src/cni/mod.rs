//! SKELETON: the flannel CNI plugin.
