use std::path::Path;

use anyhow::Context as _;

/// Builds the kernel programs (`tracer-ebpf`, nightly, bpfel-unknown-none) so that the
/// agent can embed the object with `include_bytes_aligned!`.
fn main() -> anyhow::Result<()> {
    println!("cargo::rustc-check-cfg=cfg(tracer_no_ebpf)");
    // aya-build honours AYA_BUILD_SKIP (fuzzing, docs): then there is no object to embed.
    if std::env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true")) {
        println!("cargo:rustc-cfg=tracer_no_ebpf");
    }
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?;
    let ebpf_dir = Path::new(&manifest_dir).join("../tracer-ebpf");
    let ebpf_dir = ebpf_dir
        .canonicalize()
        .with_context(|| format!("finding {}", ebpf_dir.display()))?;
    let root_dir = ebpf_dir.to_str().context("tracer-ebpf path is not UTF-8")?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "tracer-ebpf",
            root_dir,
            no_default_features: false,
            features: &[],
        }],
        aya_build::Toolchain::default(),
    )
}
