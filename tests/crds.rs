//! The CRDs under `crds/` are generated from the Rust types; this fails when they drift, and
//! checks the schema's name pattern agrees with the validation the controller and CLI run.

use scoped_secrets::api::v1alpha1::{NAME_PATTERN, ScopedSecret};
use scoped_secrets::crd::all_crds_yaml;
use scoped_secrets::scope::validate_name;

#[test]
fn committed_crds_match_the_rust_types() {
    let committed = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/crds/scopedsecrets.yaml"
    ))
    .expect("crds/scopedsecrets.yaml exists");
    assert!(
        committed == all_crds_yaml(),
        "crds/scopedsecrets.yaml is out of date: run `cargo run -- crd > crds/scopedsecrets.yaml`"
    );
}

#[test]
fn every_field_of_every_crd_has_a_description() {
    let docs: Vec<serde_yaml::Value> = serde_yaml::Deserializer::from_str(&all_crds_yaml())
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .collect();
    assert_eq!(docs.len(), 3);
    fn walk(path: &str, schema: &serde_yaml::Value, missing: &mut Vec<String>) {
        if let Some(props) = schema.get("properties").and_then(|p| p.as_mapping()) {
            for (name, sub) in props {
                let name = name.as_str().unwrap();
                let p = format!("{path}.{name}");
                // apiVersion, kind and metadata are the API server's own.
                let standard =
                    path.is_empty() && ["apiVersion", "kind", "metadata"].contains(&name);
                if sub.get("description").is_none() && !standard {
                    missing.push(p.clone());
                }
                walk(&p, sub, missing);
            }
        }
        if let Some(items) = schema.get("items") {
            walk(&format!("{path}[]"), items, missing);
        }
    }
    let mut missing = Vec::new();
    for doc in &docs {
        let kind = doc["spec"]["names"]["kind"].as_str().unwrap().to_string();
        let schema = &doc["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
        walk(&kind, schema, &mut missing);
    }
    // LabelSelector internals come from k8s-openapi and carry its own docs.
    missing.retain(|p| {
        !p.contains("namespaceSelector.")
            && !p.contains("selector.")
            && !p.contains("conditions[].")
    });
    assert!(
        missing.is_empty(),
        "fields without a description: {missing:#?}"
    );
}

#[test]
fn scoped_secret_has_status_subresource_and_printer_columns() {
    let crd = serde_yaml::to_value(<ScopedSecret as kube::CustomResourceExt>::crd()).unwrap();
    let version = &crd["spec"]["versions"][0];
    assert!(version["subresources"]["status"].is_mapping());
    let columns: Vec<&str> = version["additionalPrinterColumns"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    for want in ["Ready", "Secret", "Last sync"] {
        assert!(
            columns.contains(&want),
            "missing column {want}: {columns:?}"
        );
    }
}

#[test]
fn schema_name_pattern_agrees_with_validate_name() {
    let re = regex::Regex::new(NAME_PATTERN).unwrap();
    let samples = [
        "shop", "a.b", "A_b-9", "v1.2.3", "", "a/b", "..", "a..b", ".a", "a.", "a b", "ä",
        "x/../y", "-", "_", "a-.b", "1", "a.b.c.d",
    ];
    for s in samples {
        assert_eq!(
            re.is_match(s),
            validate_name("project", s).is_ok(),
            "schema pattern and validate_name disagree on {s:?}"
        );
    }
}
