//! Build script: tells the code whether the compiler has the AVX-512 intrinsics of `std::arch`
//! (stable since Rust 1.89). With an older compiler the direct convolution kernels
//! (`src/ops/direct.rs`) are left out and the portable im2col + GEMM path runs instead; the
//! crate's minimum supported Rust version stays that of the rest of the code.

fn main() {
    println!("cargo::rustc-check-cfg=cfg(diffuse_avx512)");
    println!("cargo::rerun-if-changed=build.rs");
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let minor = std::process::Command::new(rustc)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|v| {
            // "rustc 1.95.0 (59807616e 2026-04-14)"
            let version = v.split_whitespace().nth(1)?;
            let mut parts = version.split('.');
            let major: u32 = parts.next()?.parse().ok()?;
            let minor: u32 = parts.next()?.parse().ok()?;
            Some(if major > 1 { u32::MAX } else { minor })
        });
    if minor.is_some_and(|m| m >= 89) {
        println!("cargo::rustc-cfg=diffuse_avx512");
    }
}
