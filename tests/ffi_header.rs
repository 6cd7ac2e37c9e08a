//! The committed C header must be what cbindgen generates from `src/ffi/` now.
//!
//! Regenerate it with `MXPIPE_BLESS=1 cargo test --test ffi_header`.

use std::path::Path;

#[test]
fn committed_header_is_current() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = cbindgen::Config::from_file(root.join("cbindgen.toml"))
        .expect("cbindgen.toml is readable and valid");
    let bindings = cbindgen::Builder::new()
        .with_config(config)
        .with_src(root.join("src/ffi/mod.rs"))
        .generate()
        .expect("cbindgen generates the header");
    let mut generated = Vec::new();
    bindings.write(&mut generated);

    let committed_path = root.join("include/mxpipe.h");
    if std::env::var_os("MXPIPE_BLESS").is_some() {
        std::fs::write(&committed_path, &generated).expect("write include/mxpipe.h");
        return;
    }
    let committed = std::fs::read(&committed_path).unwrap_or_default();
    if committed != generated {
        let fresh = std::env::temp_dir().join(format!("mxpipe-{}.h", std::process::id()));
        std::fs::write(&fresh, &generated).expect("write the generated header");
        panic!(
            "include/mxpipe.h is stale: it differs from what cbindgen generates from src/ffi/.\n\
             See the difference:  diff -u {} {}\n\
             Fix it:              MXPIPE_BLESS=1 cargo test --test ffi_header",
            committed_path.display(),
            fresh.display()
        );
    }
}
