//! SKELETON: flanneld entry point (control-plane work).
fn main() {}
