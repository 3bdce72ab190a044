use which::which;

/// Rebuild when bpf-linker changes: it is what turns this crate into a BPF object.
fn main() {
    if let Ok(linker) = which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", linker.display());
    }
}
