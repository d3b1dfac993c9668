//! The real `VaultReader` on its own, as the Vault tests build it: a store for an address and
//! an auth plan, with the credential Secrets the reader reads from the in-memory API server.

use std::time::Duration;

use scoped_secrets::api::v1alpha1::{KvEngine, StoreConnection};
use scoped_secrets::vault::client::VaultReader;
use scoped_secrets::vault::{AuthPlan, Identity, SecretKeyLocation, StoreHandle};
use serde_json::json;

use super::b64;
use super::fake_api::FakeKube;

/// The ClusterVaultStore `vault` at `address`, logging in with `auth`; 5 s per request.
pub fn store(address: &str, auth: AuthPlan) -> StoreHandle {
    StoreHandle {
        identity: Identity {
            store: "ClusterVaultStore//vault/uid/1".into(),
            principal: auth.principal(),
        },
        connection: StoreConnection {
            address: address.into(),
            kv: KvEngine::default(),
            ..Default::default()
        },
        auth,
        timeout: Duration::from_secs(5),
    }
}

/// A static token, from the key `token` of Secret `scoped-secrets/vault-token`.
pub fn token_plan() -> AuthPlan {
    AuthPlan::Token {
        token: SecretKeyLocation {
            namespace: "scoped-secrets".into(),
            name: "vault-token".into(),
            key: "token".into(),
        },
    }
}

/// An API server holding the Secret of [`token_plan`] with `token`.
pub fn fake_with_token(token: &str) -> FakeKube {
    let fake = FakeKube::new();
    fake.insert(json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "vault-token", "namespace": "scoped-secrets"},
        "data": {"token": b64(token)}
    }));
    fake
}

/// A reader using the static token `token` from a Secret, and its store at `addr`.
pub fn token_reader(addr: &str, token: &str) -> (VaultReader, StoreHandle) {
    let reader = VaultReader::new(fake_with_token(token).client());
    (reader, store(addr, token_plan()))
}

/// A reader logging in with AppRole (its secret id in the in-memory API server), and its
/// store at `addr`.
pub fn approle_reader(addr: &str, role_id: String, secret_id: &str) -> (VaultReader, StoreHandle) {
    let fake = FakeKube::new();
    fake.insert(json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "approle", "namespace": "scoped-secrets"},
        "data": {"secret-id": b64(secret_id)}
    }));
    let auth = AuthPlan::AppRole {
        mount: "approle".into(),
        role_id,
        secret_id: SecretKeyLocation {
            namespace: "scoped-secrets".into(),
            name: "approle".into(),
            key: "secret-id".into(),
        },
    };
    (VaultReader::new(fake.client()), store(addr, auth))
}
