//! The producer side: stores a body once and adds entries to the work stream, pipelined.
//!
//! What `mxpipe enqueue` and the Python helper (`bindings/python/mxpipe/redis_work.py`) do; any
//! other language may do the same with `SET` and `XADD` (the format is in [`super::work`]).
//! This module only writes work; it never delivers.

use super::work::Entry;
use super::{Keys, Link};
use redis::RedisResult;

/// Entries added per round trip.
const PIPELINE: usize = 1000;

/// Stores `content` under `{NS}:body:NAME` for entries that name it in `body_ref`.
pub fn store_body(link: &mut Link, keys: &Keys, name: &str, content: &[u8]) -> RedisResult<()> {
    link.call(|c| redis::cmd("SET").arg(keys.body(name)).arg(content).query(c))
}

/// Adds `entries` to the work stream (creating it and the nodes' group if needed); returns
/// their stream IDs in order.
pub fn enqueue(link: &mut Link, keys: &Keys, entries: &[Entry]) -> RedisResult<Vec<String>> {
    link.call(|c| super::node::ensure_group(c, keys))?;
    let mut ids = Vec::with_capacity(entries.len());
    for chunk in entries.chunks(PIPELINE) {
        let mut pipe = redis::pipe();
        for entry in chunk {
            let mut cmd = redis::cmd("XADD");
            cmd.arg(keys.work()).arg("*");
            for (field, value) in entry.to_fields() {
                cmd.arg(field).arg(value);
            }
            pipe.add_command(cmd);
        }
        let got: Vec<String> = link.call(|c| pipe.query(c))?;
        ids.extend(got);
    }
    Ok(ids)
}
