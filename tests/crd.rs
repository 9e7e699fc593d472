//! The committed CRD YAML is what the Rust types generate.

use std::path::Path;

#[test]
fn committed_crds_match_the_rust_types() {
    let generated = kiln::api::crd_yaml().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for file in [
        "crds/imagebuilds.kiln.dev.yaml",
        "config/crd/imagebuilds.kiln.dev.yaml",
        "charts/kiln/crds/imagebuilds.kiln.dev.yaml",
    ] {
        let committed = std::fs::read_to_string(root.join(file)).unwrap();
        assert!(
            committed == generated,
            "{file} is out of date: run `cargo run -- crd > {file}`"
        );
    }
}
