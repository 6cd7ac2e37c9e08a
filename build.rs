//! Link settings of the C library (the `cdylib`): on Linux its SONAME is `libmxpipe.so.0`, so
//! that programs linked against it ask for the ABI generation rather than a file name, and a
//! version script keeps every symbol but `mxp_*` local. The Rust API (`rlib`) is unaffected.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=src/ffi/mxpipe.map");
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    if os == "linux" {
        let manifest = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets it");
        println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libmxpipe.so.0");
        println!("cargo:rustc-cdylib-link-arg=-Wl,--version-script={manifest}/src/ffi/mxpipe.map");
    }
}
