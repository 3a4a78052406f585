//! The whole desired state, read at one revision: for the CLI (`container ls`) and for the
//! agent's snapshot (source/follow.rs), which reads only its own host's containers.

use etcd_client::KeyValue;
use tracing::warn;

use super::{Result, Store, StoreError, etcd::key_str, keys::Kind};
use crate::model::{Container, Endpoint, Host, Network, Object, ObjectRef, State};

pub(crate) fn decode_object(what: &ObjectRef, kv: &KeyValue) -> serde_json::Result<Object> {
    let v = kv.value();
    Ok(match what {
        ObjectRef::Network(_) => Object::Network(serde_json::from_slice::<Network>(v)?),
        ObjectRef::Endpoint(_) => Object::Endpoint(serde_json::from_slice::<Endpoint>(v)?),
        // Which container this is (not an earlier one of the same name) is the key's.
        ObjectRef::Container(_) => Object::Container(Container {
            revision: kv.create_revision(),
            ..serde_json::from_slice::<Container>(v)?
        }),
        // The lease the key lives under is the truth; the value's copy may be stale.
        ObjectRef::Host(_) => Object::Host(Host { lease: kv.lease(), ..serde_json::from_slice::<Host>(v)? }),
    })
}

/// Reads the whole desired state at one revision, in pages (it can be hundreds of thousands of
/// keys, far beyond one gRPC response). With a `host` (an agent's snapshot), other hosts'
/// containers are left out: an agent
/// has no use for them, and at scale they are half of what there is to read.
///
/// The networks are read first, which fixes the revision; endpoints, containers and hosts are
/// then read at that revision in parallel, each decoded on its own task.
pub(crate) async fn load(store: &Store, host: Option<&str>) -> Result<(State, i64)> {
    let k = &store.keys;
    let (networks, rev) = load_prefix(store.clone(), k.networks(), 0, None).await?;
    let host = host.map(str::to_owned);
    let spawn = |prefix: String| tokio::spawn(load_prefix(store.clone(), prefix, rev, host.clone()));
    let (endpoints, containers, hosts) =
        tokio::join!(spawn(k.all_endpoints()), spawn(k.containers()), spawn(k.alive()));
    let mut state = State::default();
    for part in [Ok(Ok((networks, rev))), endpoints, containers, hosts] {
        let (objects, _) = part.map_err(|e| StoreError::Task { op: "load", error: e.to_string() })??;
        for object in objects {
            state.put(object);
        }
    }
    Ok((state, rev))
}

/// The objects under one prefix at `rev` (0: now); containers
/// on hosts other than `host` (if given) are skipped after reading just their host.
async fn load_prefix(
    store: Store,
    prefix: String,
    rev: i64,
    host: Option<String>,
) -> Result<(Vec<Object>, i64)> {
    /// Just enough of a container to know whose it is.
    #[derive(serde::Deserialize)]
    struct Whose<'a> {
        #[serde(borrow)]
        host: std::borrow::Cow<'a, str>,
    }
    let k = &store.keys;
    let mut objects = Vec::new();
    let rev = store
        .read_prefix_paged("load", &prefix, rev, |kv| {
            let key = key_str(kv);
            let Kind::Object(what) = k.parse(&key) else { return };
            if let (ObjectRef::Container(_), Some(host)) = (&what, &host)
                && serde_json::from_slice::<Whose<'_>>(kv.value()).is_ok_and(|w| w.host != host.as_str())
            {
                return;
            }
            match decode_object(&what, kv) {
                Ok(object) => objects.push(object),
                Err(e) => warn!(key, error = %e, "ignoring a value that does not parse"),
            }
        })
        .await?;
    Ok((objects, rev))
}

impl Store {
    /// The whole desired state at one revision, and that revision.
    pub async fn load(&self) -> Result<(State, i64)> {
        load(self, None).await
    }
}
