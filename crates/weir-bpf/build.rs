//! Builds the eBPF programs in bpf/ with clang-19 and generates their libbpf-rs skeletons
//! (Rust types for the shared structs come from the objects' BTF).

use std::path::PathBuf;

use libbpf_cargo::SkeletonBuilder;

const PROGRAMS: &[&str] = &[
    "sock",
    "pod",
    "node",
    "xdp",
    "xdp_pass",
    "kdrop",
    "tcp_health",
];

fn main() {
    // At run time: a build script built for one checkout may be run for another.
    let manifest = std::env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR");
    let root = PathBuf::from(manifest).join("../../bpf");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR"));
    let clang = std::env::var("WEIR_CLANG").unwrap_or_else(|_| "clang-19".into());
    let arch = match std::env::var("CARGO_CFG_TARGET_ARCH").as_deref() {
        Ok("x86_64") => "x86_64-linux-gnu",
        Ok("aarch64") => "aarch64-linux-gnu",
        Ok(other) => panic!("unsupported target architecture {other}"),
        Err(_) => "x86_64-linux-gnu",
    };
    for prog in PROGRAMS {
        let src = root.join(format!("{prog}.bpf.c"));
        SkeletonBuilder::new()
            .source(&src)
            .clang(&clang)
            .clang_args([
                "-O2".to_string(),
                "-g".to_string(),
                "-Wall".to_string(),
                "-Wextra".to_string(),
                "-Werror".to_string(),
                "-Wno-unused-parameter".to_string(),
                format!("-I{}", root.display()),
                format!("-I{}", root.join("include").display()),
                format!("-I/usr/include/{arch}"),
            ])
            .build_and_generate(out.join(format!("{prog}.skel.rs")))
            .unwrap_or_else(|e| panic!("building {}: {e:#}", src.display()));
    }
    println!("cargo:rerun-if-changed={}", root.display());
    println!("cargo:rerun-if-env-changed=WEIR_CLANG");
}
