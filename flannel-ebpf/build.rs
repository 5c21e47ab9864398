//! Rebuild the programs when the linker changes (aya-template's rule): a new bpf-linker can
//! change the object even when no source did.
fn main() {
    if let Ok(linker) = which::which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", linker.display());
    }
}
