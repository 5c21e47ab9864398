//! SKELETON: host networking helpers.
