//! Host-side placeholder: the programs are the `flannel` binary of this crate, built for
//! `bpfel-unknown-none`. Shared wire arithmetic lives in `flannel_common::wire`.
#![no_std]
