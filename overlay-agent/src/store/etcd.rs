//! The thin layer over etcd every operation is written in: read a few keys and ranges at one
//! revision, decide, then commit a transaction whose compares say "what I decided on has not
//! changed". A commit whose compares fail wrote nothing; the operation reads again and decides
//! again, so a refusal is always made on fresh data and names the real conflict.

use std::{collections::BTreeMap, future::Future, time::Duration};

use etcd_client::{Compare, CompareOp, GetOptions, KeyValue, KvClient, Txn, TxnOp, TxnOpResponse};
use serde::de::DeserializeOwned;
use tracing::warn;

use super::{Result, Store, StoreError};

/// What to read: one key, or every key under a prefix.
#[derive(Clone, Debug)]
pub(crate) enum Range {
    Key(String),
    Prefix(String),
}

/// The result of reading several ranges at one revision.
pub(crate) struct View {
    pub rev: i64,
    results: Vec<Vec<KeyValue>>,
}

impl View {
    /// The key read as `Range::Key` at position `i`.
    pub fn key(&self, i: usize) -> Option<&KeyValue> {
        self.results[i].first()
    }

    /// The keys read as `Range::Prefix` at position `i`.
    pub fn prefix(&self, i: usize) -> &[KeyValue] {
        &self.results[i]
    }

    /// `prefix(i)` of a range that may not have been read (then empty).
    pub fn prefix_if_read(&self, i: usize) -> &[KeyValue] {
        self.results.get(i).map_or(&[], Vec::as_slice)
    }
}

/// "This key still is what I read": same modification, or still absent.
pub(crate) fn unchanged(key: &str, kv: Option<&KeyValue>) -> Compare {
    match kv {
        Some(kv) => Compare::mod_revision(key, CompareOp::Equal, kv.mod_revision()),
        None => absent(key),
    }
}

pub(crate) fn absent(key: &str) -> Compare {
    Compare::version(key, CompareOp::Equal, 0)
}

/// "Nothing under this prefix was created or changed since revision `rev`". Deletions pass;
/// every prefix guarded this way is one where a deletion cannot break the decision.
pub(crate) fn range_unchanged_since(prefix: &str, rev: i64) -> Compare {
    Compare::mod_revision(prefix, CompareOp::Less, rev + 1).with_prefix()
}

pub(crate) fn key_str(kv: &KeyValue) -> String {
    String::from_utf8_lossy(kv.key()).into_owned()
}

pub(crate) fn decode<T: DeserializeOwned>(kv: &KeyValue) -> Result<T> {
    serde_json::from_slice(kv.value()).map_err(|error| StoreError::Corrupt { key: key_str(kv), error })
}

/// Decodes a value read as part of a listing. One that does not parse is skipped with a
/// warning naming its key: a single bad record (written by hand, by a newer layout, or cut
/// short) must not hide every good one from `ls`, `inspect` or the operations that only need
/// to find something else in the same range.
pub(crate) fn decode_or_skip<T: DeserializeOwned>(kv: &KeyValue) -> Option<T> {
    decode(kv).map_err(|e| warn!(key = key_str(kv), error = %e, "ignoring a value that does not parse")).ok()
}

pub(crate) fn encode<T: serde::Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("model values always serialize")
}

/// Largest response the store's reads accept (gRPC's default is 4 MiB).
const MAX_RESPONSE: usize = 256 << 20;
/// Keys per page when reading a whole state.
const PAGE: i64 = 10_000;

/// The end of the range of keys starting with `prefix` (the prefix with its last byte + 1).
fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // Every byte was 0xff: the range runs to the end of the keyspace.
    vec![0]
}

/// Optimistic retries: each failed commit lost a race, so the next attempt starts after a
/// short random pause (which keeps many contending clients from colliding in lock step).
pub(crate) struct Retry {
    op: &'static str,
    attempt: u32,
}

/// Enough for dozens of clients contending for the same key; each attempt is a few ms.
const MAX_ATTEMPTS: u32 = 200;

impl Retry {
    pub fn new(op: &'static str) -> Self {
        Self { op, attempt: 0 }
    }

    pub async fn again(&mut self) -> Result<()> {
        self.attempt += 1;
        if self.attempt >= MAX_ATTEMPTS {
            return Err(StoreError::Contended { op: self.op, attempts: self.attempt });
        }
        let cap = u64::from((2 * self.attempt).min(40));
        let jitter = u64::from(u16::from_ne_bytes(super::random_bytes::<2>())) % cap.max(1);
        tokio::time::sleep(Duration::from_millis(1 + jitter)).await;
        Ok(())
    }
}

impl Store {
    /// Runs one etcd request with the store's timeout.
    pub(crate) async fn call<T>(
        &self,
        op: impl Into<String>,
        fut: impl Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T> {
        match tokio::time::timeout(self.timeout, fut).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(error)) => {
                Err(StoreError::Etcd { op: op.into(), endpoints: self.endpoints.clone(), error })
            }
            Err(_) => Err(StoreError::Unreachable {
                op: op.into(),
                endpoints: self.endpoints.clone(),
                after: self.timeout,
            }),
        }
    }

    /// Reads `ranges` at one revision (one read-only transaction).
    /// A KV client that accepts large responses: a range over a big network's addresses or
    /// endpoints passes gRPC's default 4 MiB long before etcd's own limits matter. (The agent's
    /// snapshot, which can be far larger, is read in pages; see `read_prefix_paged`.)
    pub(crate) fn kv(&self) -> KvClient {
        self.client.kv_client().max_decoding_message_size(MAX_RESPONSE)
    }

    /// Every key under `prefix` at revision `rev` (0: the current one), read `PAGE` keys at a
    /// time so no response grows with the state. Returns the revision read at. Each page goes
    /// to `each` as it arrives, so the caller never holds more than one page of raw values.
    pub(crate) async fn read_prefix_paged(
        &self,
        op: &str,
        prefix: &str,
        mut rev: i64,
        mut each: impl FnMut(&KeyValue),
    ) -> Result<i64> {
        let end = prefix_end(prefix);
        let mut from = prefix.as_bytes().to_vec();
        let mut kv = self.kv();
        loop {
            let mut opts = GetOptions::new().with_range(end.clone()).with_limit(PAGE);
            if rev != 0 {
                opts = opts.with_revision(rev);
            }
            let resp = self.call(format!("{op}: read {prefix}"), kv.get(from.clone(), Some(opts))).await?;
            if rev == 0 {
                rev = resp.header().map_or(0, etcd_client::ResponseHeader::revision);
            }
            let kvs = resp.kvs();
            kvs.iter().for_each(&mut each);
            match kvs.last() {
                Some(last) if resp.more() => {
                    // The next page starts just after the last key read.
                    from = last.key().to_vec();
                    from.push(0);
                }
                _ => return Ok(rev),
            }
        }
    }

    pub(crate) async fn view(&self, op: &str, ranges: &[Range]) -> Result<View> {
        let ops: Vec<TxnOp> = ranges
            .iter()
            .map(|r| match r {
                Range::Key(k) => TxnOp::get(k.as_str(), None),
                Range::Prefix(p) => TxnOp::get(p.as_str(), Some(GetOptions::new().with_prefix())),
            })
            .collect();
        let mut kv = self.kv();
        let resp = self.call(format!("{op}: read"), kv.txn(Txn::new().and_then(ops))).await?;
        let rev = resp.header().map_or(0, etcd_client::ResponseHeader::revision);
        let results = resp
            .op_responses()
            .into_iter()
            .map(|r| match r {
                TxnOpResponse::Get(mut g) => g.take_kvs(),
                _ => Vec::new(),
            })
            .collect();
        Ok(View { rev, results })
    }

    /// Commits `ops` if every compare holds. Returns the transaction's revision, or None when
    /// a compare failed (nothing was written).
    pub(crate) async fn commit(
        &self,
        op: &str,
        compares: Vec<Compare>,
        ops: Vec<TxnOp>,
    ) -> Result<Option<i64>> {
        let mut kv = self.kv();
        let resp =
            self.call(format!("{op}: commit"), kv.txn(Txn::new().when(compares).and_then(ops))).await?;
        Ok(resp.succeeded().then(|| resp.header().map_or(0, etcd_client::ResponseHeader::revision)))
    }

    pub(crate) async fn get(&self, op: &str, key: &str) -> Result<(Option<KeyValue>, i64)> {
        let mut kv = self.kv();
        let mut resp = self.call(format!("{op}: read {key}"), kv.get(key, None)).await?;
        let rev = resp.header().map_or(0, etcd_client::ResponseHeader::revision);
        Ok((resp.take_kvs().into_iter().next(), rev))
    }

    pub(crate) async fn list(&self, op: &str, prefix: &str) -> Result<Vec<KeyValue>> {
        let view = self.view(op, &[Range::Prefix(prefix.to_owned())]).await?;
        Ok(view.results.into_iter().next().unwrap_or_default())
    }

    /// Every key under the prefix with its value and lease: for tests and debugging.
    pub async fn dump(&self) -> Result<BTreeMap<String, (String, i64)>> {
        Ok(self
            .list("dump", &self.keys.root())
            .await?
            .into_iter()
            .map(|kv| (key_str(&kv), (String::from_utf8_lossy(kv.value()).into_owned(), kv.lease())))
            .collect())
    }

    /// The current revision of the store.
    pub async fn revision(&self) -> Result<i64> {
        Ok(self.get("revision", &self.keys.root()).await?.1)
    }
}

#[cfg(test)]
mod tests {
    use super::prefix_end;

    #[test]
    fn prefix_end_is_the_next_key_after_every_key_with_the_prefix() {
        assert_eq!(prefix_end("/overlay/v1/endpoints/"), b"/overlay/v1/endpoints0".to_vec());
        assert_eq!(prefix_end("/p/ab"), b"/p/ac".to_vec());
    }
}
