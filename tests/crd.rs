//! The committed CRD YAML is what the Rust types generate.

use std::path::Path;

#[test]
fn committed_crds_match_the_rust_types() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for (kind, generated) in [
        ("imagebuild", kiln::api::crd_yaml().unwrap()),
        ("imagepipeline", kiln::api::pipeline_crd_yaml().unwrap()),
    ] {
        for dir in ["crds", "config/crd", "charts/kiln/crds"] {
            let file = format!("{dir}/{kind}s.kiln.dev.yaml");
            let committed = std::fs::read_to_string(root.join(&file)).unwrap();
            assert!(
                committed == generated,
                "{file} is out of date: run `cargo run -- crd {kind} > {file}`"
            );
        }
    }
}

/// `kubectl explain` has something useful to say about every field.
#[test]
fn every_field_has_its_own_description() {
    let mut missing = Vec::new();
    for text in [
        kiln::api::crd_yaml().unwrap(),
        kiln::api::pipeline_crd_yaml().unwrap(),
    ] {
        let crd: serde_json::Value = serde_yaml::from_str(&text).unwrap();
        let schema = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"];
        let kind = crd["spec"]["names"]["kind"].as_str().unwrap().to_string();
        walk(&schema["spec"], &format!("{kind}.spec"), &mut missing);
        walk(&schema["status"], &format!("{kind}.status"), &mut missing);
    }
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
    assert!(
        missing.is_empty(),
        "fields without a description: {missing:#?}"
    );
}
