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

/// `kubectl explain` has something useful to say about every field.
#[test]
fn every_field_has_its_own_description() {
    let crd: serde_json::Value = serde_yaml::from_str(&kiln::api::crd_yaml().unwrap()).unwrap();
    let schema = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"];
    let mut missing = Vec::new();
    fn walk(node: &serde_json::Value, path: &str, missing: &mut Vec<String>) {
        let Some(props) = node["properties"].as_object() else {
            return;
        };
        for (k, v) in props {
            let p = format!("{path}.{k}");
            match v["description"].as_str() {
                None => missing.push(p.clone()),
                // The generic text of the Kubernetes Time type says nothing about the field.
                Some(d) if d.starts_with("Time is a wrapper") => missing.push(p.clone()),
                Some(_) => {}
            }
            walk(v, &p, missing);
            walk(&v["items"], &format!("{p}[]"), missing);
        }
    }
    walk(&schema["spec"], "spec", &mut missing);
    walk(&schema["status"], "status", &mut missing);
    assert!(
        missing.is_empty(),
        "fields without a description: {missing:#?}"
    );
}
