//! The workload controller driven by hand: its caches filled from lists, as a reflector fills
//! them after a (re-)list, then every workload reconciled once, as the running controller
//! does after the events so far. Tests move a manual clock in between; nothing sleeps.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use k8s_openapi::ByteString;

use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, DynamicObject, ListParams};
use kube::runtime::controller::Action;
use kube::runtime::reflector::{ObjectRef, store::Writer};
use kube::runtime::watcher::Event;
use scoped_secrets::api::v1alpha1::ScopedSecret;
use scoped_secrets::controller::workloads::{self, Restarts};
use scoped_secrets::controller::{Context, caches};
use scoped_secrets::rollout::apply::argo_rollouts_served;
use scoped_secrets::rollout::detect::Reads;
use scoped_secrets::rollout::{Workload, WorkloadKind};
use tokio::sync::mpsc;

/// The workload controller's caches, filled by the test.
pub struct Hand {
    pub restarts: Arc<Restarts>,
    writers: Mutex<Writers>,
    woken: Mutex<mpsc::UnboundedReceiver<ObjectRef<Workload>>>,
}

/// What the index of one kind's workloads is shown, as the watch shows it each event.
type Observe = Box<dyn Fn(&Event<Workload>) + Send + Sync>;

struct Writers {
    scoped: Writer<ScopedSecret>,
    secrets: Writer<caches::ManagedSecret>,
    workloads: Vec<(WorkloadKind, Writer<Workload>, Observe)>,
}

/// Replaces what `writer` holds with `items`, each as `projection` makes it, as a re-list
/// does.
fn relist<K, P>(writer: &mut Writer<P>, items: Vec<K>, projection: impl Fn(K) -> P)
where
    P: kube::Resource + Clone + 'static,
    P::DynamicType: Eq + std::hash::Hash + Clone,
{
    writer.apply_watcher_event(&Event::Init);
    for item in items {
        writer.apply_watcher_event(&Event::InitApply(projection(item)));
    }
    writer.apply_watcher_event(&Event::InitDone);
}

impl Hand {
    /// The workload controller of an operator like `ctx`'s, with caches of its own: the
    /// ScopedSecret reconciles of `ctx` keep reading the API server, as tests expect.
    pub fn new(ctx: Arc<Context>) -> Self {
        let own = Context::new(
            ctx.client.clone(),
            ctx.source.clone(),
            ctx.hmac_key.clone(),
            ctx.config.clone(),
        );
        let own = Arc::new(own.with_clock(ctx.clock.clone()));
        let scoped = Writer::default();
        let secrets = Writer::default();
        own.caches.add(
            None,
            caches::ScopeCaches {
                namespaces: caches::Cache::filled(Writer::default().as_reader()),
                vault_stores: caches::Cache::filled(Writer::default().as_reader()),
                cluster_stores: caches::Cache::filled(Writer::default().as_reader()),
                secrets: caches::Cache::filled(secrets.as_reader()),
                scoped_secrets: scoped.as_reader(),
            },
        );
        let restarts = Restarts::new(own);
        let (wake, woken) = mpsc::unbounded_channel();
        let workloads = WorkloadKind::ALL
            .into_iter()
            .map(|kind| {
                let writer = Writer::new(kind);
                let observe = restarts.add_workloads(kind, writer.as_reader(), wake.clone());
                (kind, writer, Box::new(observe) as Observe)
            })
            .collect();
        Hand {
            restarts,
            writers: Mutex::new(Writers {
                scoped,
                secrets,
                workloads,
            }),
            woken: Mutex::new(woken),
        }
    }

    /// Lists every cache again from the cluster (Argo Rollouts when discovery serves them).
    pub async fn relist(&self) -> Result<(), kube::Error> {
        self.relist_scoped_secrets().await?;
        self.relist_workloads().await
    }

    /// Lists the managed Secrets and ScopedSecrets again.
    pub async fn relist_scoped_secrets(&self) -> Result<(), kube::Error> {
        let client = self.restarts.ctx.client.clone();
        let lp = ListParams::default();
        let managed = lp.clone().labels("scopedsecrets.io/managed=true");
        let secrets = Api::<Secret>::all(client.clone())
            .list_metadata(&managed)
            .await?;
        let scoped = Api::<ScopedSecret>::all(client).list(&lp).await?;
        let mut w = self.writers.lock().unwrap();
        relist(&mut w.secrets, secrets.items, caches::ManagedSecret::new);
        let names: Vec<ObjectRef<ScopedSecret>> =
            scoped.items.iter().map(ObjectRef::from_obj).collect();
        let trim = caches::trimmed(caches::trim_scoped_secret);
        relist(&mut w.scoped, scoped.items, trim);
        // As the operator hears of each ScopedSecret listed (without the wake-ups: every
        // workload is reconciled after a re-list anyway).
        for ss in &names {
            self.restarts.note(ss);
        }
        Ok(())
    }

    /// Lists the workloads again (Argo Rollouts when discovery serves them).
    pub async fn relist_workloads(&self) -> Result<(), kube::Error> {
        let client = self.restarts.ctx.client.clone();
        let argo = argo_rollouts_served(&client).await?;
        let mut workloads = Vec::new();
        for kind in WorkloadKind::ALL {
            let api = Api::<DynamicObject>::all_with(client.clone(), &kind.resource());
            workloads.push(match kind {
                WorkloadKind::Rollout if !argo => Vec::new(),
                _ => api.list(&ListParams::default()).await?.items,
            });
        }
        let mut w = self.writers.lock().unwrap();
        for ((kind, writer, observe), items) in w.workloads.iter_mut().zip(workloads) {
            // As the watch does: each event projected, shown to the index, then stored.
            let listed = items.into_iter().map(Event::InitApply);
            let events = std::iter::once(Event::Init)
                .chain(listed)
                .chain([Event::InitDone]);
            for event in events.map(|e| caches::project(e, |o| Workload::new(*kind, &o))) {
                observe(&event);
                writer.apply_watcher_event(&event);
            }
        }
        Ok(())
    }

    /// Reconciles every cached workload once.
    pub async fn reconcile_all(&self) -> Vec<Result<Action, scoped_secrets::controller::Error>> {
        let cached: Vec<Arc<Workload>> = {
            let w = self.writers.lock().unwrap();
            let writers = w.workloads.iter();
            writers
                .flat_map(|(_, w, _)| w.as_reader().state())
                .collect()
        };
        let mut out = Vec::new();
        for obj in cached {
            out.push(workloads::reconcile(obj, self.restarts.clone()).await);
        }
        out
    }

    /// Reconciles the cached workload `kind` `namespace/name` once.
    pub async fn reconcile(
        &self,
        kind: WorkloadKind,
        namespace: &str,
        name: &str,
    ) -> Result<Action, scoped_secrets::controller::Error> {
        let obj = {
            let w = self.writers.lock().unwrap();
            let (_, writer, _) = w.workloads.iter().find(|(k, ..)| *k == kind).unwrap();
            let id = ObjectRef::new_with(name, kind).within(namespace);
            writer.as_reader().get(&id).expect("the workload is cached")
        };
        workloads::reconcile(obj, self.restarts.clone()).await
    }

    /// The workloads the controller woke since the last call (as `Kind/name`, in order).
    pub fn woken(&self) -> Vec<String> {
        let mut woken = self.woken.lock().unwrap();
        std::iter::from_fn(|| woken.try_recv().ok())
            .map(|r| format!("{}/{}", r.dyntype.as_str(), r.name))
            .collect()
    }

    /// The workloads cached.
    pub fn cached(&self) -> usize {
        let w = self.writers.lock().unwrap();
        w.workloads
            .iter()
            .map(|(_, writer, _)| writer.as_reader().len())
            .sum()
    }
}

/// The annotation an earlier version of the operator wrote for a reader of `reads`: the first
/// 8 bytes, in hex, of the HMAC of the keys it reads and their values, each length-prefixed.
pub fn consumer_hash(key: &[u8], data: &BTreeMap<String, ByteString>, reads: &Reads) -> String {
    use hmac::{Hmac, Mac};
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(key).unwrap();
    let read = |k: &String| match reads {
        Reads::Whole => true,
        Reads::Keys(keys) => keys.contains(k),
    };
    for (k, v) in data.iter().filter(|(k, _)| read(k)) {
        mac.update(&(k.len() as u64).to_be_bytes());
        mac.update(k.as_bytes());
        mac.update(&(v.0.len() as u64).to_be_bytes());
        mac.update(&v.0);
    }
    let hmac = mac.finalize().into_bytes();
    hmac[..8].iter().map(|b| format!("{b:02x}")).collect()
}
