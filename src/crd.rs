//! The CRDs as YAML, generated from the Rust types (`scoped-secrets crd`, `crds/`).

use kube::CustomResourceExt;

use crate::api::v1alpha1::{ClusterVaultStore, ScopedSecret, VaultStore};

/// Every CRD of the operator, as one multi-document YAML stream.
pub fn all_crds_yaml() -> String {
    [
        ScopedSecret::crd(),
        VaultStore::crd(),
        ClusterVaultStore::crd(),
    ]
    .iter()
    .map(|crd| {
        format!(
            "---\n{}",
            serde_yaml::to_string(crd).expect("a CRD serialises")
        )
    })
    .collect()
}
