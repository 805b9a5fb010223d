//! The ingest decision, free of HTTP: from a decompressed body to envelopes ready to publish
//! and the per-item report. The handler, the Lambda adapter and the fuzz target share it.

use serde::Serialize;

use crate::auth::AdvertiserScope;
use crate::body::{split_items, BodyFormat, Limits, RawItem};
use crate::error::ApiError;
use shared::envelope::{Envelope, PackedEvent, Packer};
use shared::event::{ErrorCode, FieldError, RawEvent, ValidationPolicy};
use shared::Clock;

/// Longest `event_id` a rejection echoes, in bytes (a UUID has 36).
const MAX_EVENT_ID_ECHOED: usize = 64;

/// One rejected item of a request.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Rejection {
    /// Position of the item in the request (0-based; NDJSON blank lines are not counted).
    pub index: usize,
    /// The item's `event_id` if it had a readable one of at most 64 bytes (a longer one is
    /// no UUID; the `event_id` error quotes its start).
    pub event_id: Option<String>,
    /// Every violation found.
    pub errors: Vec<FieldError>,
}

/// The body of a 202 or 400 answer.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct IngestReport {
    /// Events accepted (published).
    pub accepted: usize,
    /// Items rejected, with reasons.
    pub rejected: Vec<Rejection>,
}

/// A request checked and packed, waiting for its publish.
#[derive(Debug)]
pub struct Prepared {
    /// Envelopes holding every accepted event.
    pub envelopes: Vec<Envelope>,
    /// How many events they hold.
    pub accepted: usize,
    /// What was rejected.
    pub rejected: Vec<Rejection>,
    /// True when every item was valid but none was for an allowed advertiser (answer 403).
    pub all_forbidden: bool,
}

/// What [`prepare`] needs besides the body.
#[derive(Debug, Clone, Copy)]
pub struct PrepareContext<'a> {
    /// Size limits.
    pub limits: &'a Limits,
    /// Validation rules.
    pub policy: &'a ValidationPolicy,
    /// Time source for the `occurred_at` window.
    pub clock: &'a dyn Clock,
    /// Envelope packing.
    pub packer: &'a Packer,
    /// Tenant of the key, for the `spillway-tenant` attribute.
    pub tenant: &'a str,
    /// Advertisers the key may send for.
    pub scope: &'a AdvertiserScope,
}

/// Splits, validates, authorises and packs a decompressed body.
///
/// # Errors
/// [`ApiError`] for a body that cannot be read as events at all or is over a limit.
pub fn prepare(
    body: &[u8],
    format: BodyFormat,
    cx: &PrepareContext<'_>,
) -> Result<Prepared, ApiError> {
    let items = split_items(body, format, cx.limits)?;
    let mut packed = Vec::with_capacity(items.len());
    let mut rejected = Vec::new();
    let mut forbidden = 0;
    for (index, item) in items.into_iter().enumerate() {
        let raw = match item {
            RawItem::Bad(e) => {
                rejected.push(Rejection {
                    index,
                    event_id: None,
                    errors: vec![e],
                });
                continue;
            }
            RawItem::Json(raw) => raw,
        };
        // Read straight from the item's text: no `Value` tree, keys matched as they come.
        let raw = match RawEvent::from_json_str(raw.get(), cx.policy, cx.clock) {
            Ok(raw) => raw,
            Err(e) => {
                let err =
                    FieldError::new("", ErrorCode::InvalidJson, format!("not valid JSON: {e}"));
                rejected.push(Rejection {
                    index,
                    event_id: None,
                    errors: vec![err],
                });
                continue;
            }
        };
        // The id is copied only for a report, and only when it could be one: a long string
        // echoed whole (32 KiB of escaped characters) made the answer many times the request.
        let event_id = || {
            raw.event_id()
                .filter(|id| id.len() <= MAX_EVENT_ID_ECHOED)
                .map(str::to_owned)
        };
        let event = match raw.validate() {
            Ok(ev) => ev,
            Err(errors) => {
                rejected.push(Rejection {
                    index,
                    event_id: event_id(),
                    errors,
                });
                continue;
            }
        };
        if !cx.scope.allows(event.advertiser_id.as_str()) {
            forbidden += 1;
            let err = FieldError::new(
                "advertiser_id",
                ErrorCode::Forbidden,
                format!(
                    "this API key may not send events for advertiser {:?}",
                    event.advertiser_id.as_str()
                ),
            );
            rejected.push(Rejection {
                index,
                event_id: event_id(),
                errors: vec![err],
            });
            continue;
        }
        // Validation leaves nothing that cannot be written; refused rather than sent empty.
        let sendable = PackedEvent::new(&event)
            .map_err(|e| FieldError::new("", ErrorCode::InvalidValue, e.to_string()))
            .and_then(|p| match cx.packer.check_fits(&p) {
                Ok(()) => Ok(p),
                Err(e) => Err(FieldError::new("", ErrorCode::TooLarge, e.to_string())),
            });
        match sendable {
            Ok(p) => packed.push(p),
            Err(err) => rejected.push(Rejection {
                index,
                event_id: event_id(),
                errors: vec![err],
            }),
        }
    }
    let accepted = packed.len();
    // check_fits passed for each event, so packing cannot fail; map defensively anyway.
    let envelopes = cx
        .packer
        .pack(cx.tenant, &packed)
        .map_err(|e| ApiError::PayloadTooLarge(e.to_string()))?;
    Ok(Prepared {
        envelopes,
        accepted,
        all_forbidden: accepted == 0 && forbidden > 0 && forbidden == rejected.len(),
        rejected,
    })
}
