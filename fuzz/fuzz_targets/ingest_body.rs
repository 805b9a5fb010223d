//! Fuzzes the ingest decision: `decompress` then `prepare`, with the default limits, policy
//! and packer and a key allowed for any advertiser. It must never panic, and what it reports
//! must be consistent with the envelopes it built.

#![no_main]

use ingest_api::auth::AdvertiserScope;
use ingest_api::body::{decompress, Limits};
use ingest_api::ingest::{prepare, PrepareContext};
use libfuzzer_sys::fuzz_target;
use shared::clock::FixedClock;
use shared::envelope::{decode_message, Packer, ATTR_CONTENT_ENCODING};
use shared::event::ValidationPolicy;
use spillway_fuzz::{fuzz_now, split_input};

fuzz_target!(|data: &[u8]| {
    let Some((format, encoding, wire)) = split_input(data) else {
        return;
    };
    let limits = Limits::default();
    let Ok(decoded) = decompress(wire, encoding, limits.max_decoded_bytes) else {
        return;
    };
    assert!(decoded.len() <= limits.max_decoded_bytes);
    let policy = ValidationPolicy::default();
    let clock = FixedClock::at(fuzz_now());
    let packer = Packer::default();
    let scope = AdvertiserScope::Any;
    let cx = PrepareContext {
        limits: &limits,
        policy: &policy,
        clock: &clock,
        packer: &packer,
        tenant: "fuzz",
        scope: &scope,
    };
    let Ok(prepared) = prepare(&decoded, format, &cx) else {
        return;
    };
    // Invariants a 202 relies on: every accepted event is in exactly one envelope, every
    // envelope fits the broker budget and decodes back to as many events.
    let packed: usize = prepared.envelopes.iter().map(|e| e.event_count).sum();
    assert_eq!(packed, prepared.accepted);
    assert!(prepared.accepted + prepared.rejected.len() <= limits.max_events);
    assert!(!prepared.all_forbidden, "scope Any forbids nothing");
    for env in &prepared.envelopes {
        assert!(env.body.len() <= packer.config().budget_bytes);
        let encoding = env.attributes.get(ATTR_CONTENT_ENCODING).map(String::as_str);
        let back = decode_message(&env.body, encoding);
        assert!(
            back.as_ref().is_ok_and(|d| d.events.len() == env.event_count),
            "an envelope must decode back to its events: {back:?}"
        );
    }
    // The report must serialise (it is the response body).
    assert!(serde_json::to_vec(&prepared.rejected).is_ok());
});
