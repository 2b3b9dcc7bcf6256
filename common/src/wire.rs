//! The agent → collector batch frame (specified in `docs/wire-protocol.md`).
//!
//! Pure: bytes to values and back, no I/O. Every decode is capped before and after
//! decompression: the frame length, the declared and actual uncompressed length, the event
//! count, each event's length, and every string inside an event (bincode's limit plus
//! [`Event::check_limits`]).
//!
//! ```text
//! 0   4  magic "KTRB"
//! 4   2  version (u16 BE) = 1
//! 6   2  flags (u16 BE) = 0 (reserved)
//! 8   8  batch sequence (u64 BE)
//! 16  4  event count (u32 BE)
//! 20  4  uncompressed payload length (u32 BE)
//! 24  4  compressed payload length (u32 BE)
//! 28  2  agent id length (u16 BE)
//! 30  2  reserved, 0
//! 32  n  agent id (UTF-8)
//! ..  z  payload, one or more zstd frames back to back
//! ..  4  CRC-32 (IEEE, u32 BE) of every byte before it
//! ```
//! The payload, uncompressed (the frames' outputs concatenated), is `count` records
//! `u32 LE length ‖ bincode(event v1)`. The agent compresses large chunks of records when it
//! buffers them and seals a batch by concatenating their frames, so a batch is compressed
//! once, not once to buffer and again to send.
//! bincode is kept behind this module so it can be swapped without touching callers.

use bincode::de::Decoder;
use bincode::enc::Encoder;
use bincode::error::{DecodeError, EncodeError};
use bincode::{Decode, Encode};

use crate::event::{Deployment, Event, EventType, ResultCode, Usage};

pub const MAGIC: &[u8; 4] = b"KTRB";
pub const VERSION: u16 = 1;
pub const HEADER_LEN: usize = 32;
const TRAILER_LEN: usize = 4;
/// Largest single event record accepted in a payload.
pub const MAX_EVENT_BYTES: usize = 64 * 1024;
/// Request header on `POST /v1/batches` and `GET /v1/ping`: the agent's clock when it sent the
/// request, unix milliseconds. Outside the frame, so a resent frame stays byte-identical.
pub const SENT_AT_HEADER: &str = "x-keytrail-sent-at";
/// Response header on every answer of the collector's receive port: the collector's clock when
/// the request arrived, unix milliseconds. Agents measure their clock's offset from it.
pub const RECEIVED_AT_HEADER: &str = "x-keytrail-received-at";

type Config = bincode::config::Configuration<
    bincode::config::LittleEndian,
    bincode::config::Varint,
    bincode::config::Limit<MAX_EVENT_BYTES>,
>;
const CONFIG: Config = bincode::config::standard().with_limit::<MAX_EVENT_BYTES>();

/// A per-agent batch sequence number; survives restarts, never reused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BatchSeq(pub u64);

/// What a frame header says, readable before decompressing anything.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    pub version: u16,
    pub seq: BatchSeq,
    pub event_count: u32,
    pub uncompressed_len: u32,
    pub compressed_len: u32,
    pub agent_id: String,
}

/// A decoded batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Batch {
    pub header: FrameHeader,
    pub events: Vec<Event>,
}

/// Caps applied when decoding; all are checked before the work they bound.
#[derive(Clone, Copy, Debug)]
pub struct DecodeLimits {
    /// Largest frame accepted (compressed, with header).
    pub max_frame_bytes: usize,
    /// Largest payload after decompression (`[receive].max_batch_bytes`).
    pub max_uncompressed_bytes: usize,
    /// Most events in one batch.
    pub max_events: u32,
}

impl Default for DecodeLimits {
    fn default() -> Self {
        DecodeLimits {
            max_frame_bytes: 16 << 20,
            max_uncompressed_bytes: 16 << 20,
            max_events: 1_000_000,
        }
    }
}

/// Why a frame was refused. All are permanent: resending the same bytes fails the same way.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    #[error("frame too short: {0} bytes")]
    TooShort(usize),
    #[error("bad magic: not a keytrail batch frame")]
    BadMagic,
    #[error("unsupported wire version {0} (this build reads version {VERSION})")]
    UnsupportedVersion(u16),
    #[error("frame is {0} bytes, over the limit of {1}")]
    FrameTooLarge(usize, usize),
    #[error("frame length {actual} does not match the header's {declared}")]
    LengthMismatch { declared: usize, actual: usize },
    #[error("checksum mismatch: frame corrupted")]
    Checksum,
    #[error("agent id is not valid UTF-8 or is empty")]
    BadAgentId,
    #[error("declared uncompressed size {0} is over the limit of {1}")]
    UncompressedTooLarge(usize, usize),
    #[error("declared event count {0} is over the limit of {1}")]
    TooManyEvents(u32, u32),
    #[error("decompression failed: {0}")]
    Decompress(String),
    #[error("payload decompressed to {actual} bytes, header said {declared}")]
    PayloadLengthMismatch { declared: usize, actual: usize },
    #[error("event {index}: {reason}")]
    BadEvent { index: usize, reason: String },
    #[error("payload holds {actual} events, header said {declared}")]
    CountMismatch { declared: u32, actual: u32 },
}

/// Appends one event record (`u32 LE length ‖ bincode`) to an uncompressed payload.
/// The event's `agent_id` is not encoded: the frame header carries it.
pub fn append_event(event: &Event, payload: &mut Vec<u8>) {
    let start = payload.len();
    payload.extend_from_slice(&[0; 4]);
    // Writing to a Vec cannot fail; an event over MAX_EVENT_BYTES cannot be built by
    // `event::parse_body` (every field is capped far below it).
    bincode::encode_into_std_write(EventV1Ref(event), payload, CONFIG)
        .expect("encoding an event into memory cannot fail");
    let len = (payload.len() - start - 4) as u32;
    payload[start..start + 4].copy_from_slice(&len.to_le_bytes());
}

/// Splits an uncompressed payload into its records without decoding them: `(offset, len)`
/// of each whole record including its length prefix. Used by the agent buffer to cut chunks.
pub fn record_spans(payload: &[u8]) -> Result<Vec<(usize, usize)>, WireError> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < payload.len() {
        let len = read_record_len(payload, at, out.len())?;
        out.push((at, 4 + len));
        at += 4 + len;
    }
    Ok(out)
}

fn read_record_len(payload: &[u8], at: usize, index: usize) -> Result<usize, WireError> {
    let bad = |reason: &str| WireError::BadEvent {
        index,
        reason: reason.to_string(),
    };
    let prefix = payload.get(at..at + 4).ok_or_else(|| bad("truncated length prefix"))?;
    let len = u32::from_le_bytes(prefix.try_into().expect("4 bytes")) as usize;
    if len > MAX_EVENT_BYTES {
        return Err(bad("record longer than the 64 KiB limit"));
    }
    if payload.len() - at - 4 < len {
        return Err(bad("truncated record"));
    }
    Ok(len)
}

/// Decodes every record of an uncompressed payload, stamping `agent_id` on each event.
pub fn decode_payload(payload: &[u8], agent_id: &str, max_events: u32) -> Result<Vec<Event>, WireError> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < payload.len() {
        let index = out.len();
        if index as u64 >= max_events as u64 {
            return Err(WireError::TooManyEvents(index as u32 + 1, max_events));
        }
        let len = read_record_len(payload, at, index)?;
        let record = &payload[at + 4..at + 4 + len];
        let (EventV1(mut event), used) =
            bincode::decode_from_slice::<EventV1, _>(record, CONFIG).map_err(|e| WireError::BadEvent {
                index,
                reason: e.to_string(),
            })?;
        if used != len {
            return Err(WireError::BadEvent {
                index,
                reason: "trailing bytes in record".into(),
            });
        }
        event.agent_id = agent_id.to_string();
        event
            .check_limits()
            .map_err(|reason| WireError::BadEvent { index, reason })?;
        out.push(event);
        at += 4 + len;
    }
    Ok(out)
}

/// Builds a sealed frame from an uncompressed payload holding `event_count` records (with a
/// compression context of its own; [`FrameSealer`] keeps one from frame to frame).
pub fn seal_frame(agent_id: &str, seq: BatchSeq, event_count: u32, payload: &[u8], zstd_level: i32) -> Vec<u8> {
    FrameSealer::new(zstd_level).seal(agent_id, seq, event_count, payload)
}

/// Seals frames with one zstd compression context, kept from frame to frame. Setting a
/// context up for a level-3 frame of a megabyte allocates and clears about a megabyte of
/// tables: with the agent's glibc thresholds, a 5,000-event frame took 1,172 µs with a fresh
/// context and 718 µs with a kept one (`frame_sealer_cost`, `docs/benchmarks.md`).
pub struct FrameSealer {
    compressor: zstd::bulk::Compressor<'static>,
    /// The compressed payload, kept too: its pages stay mapped from frame to frame.
    compressed: Vec<u8>,
}

impl FrameSealer {
    pub fn new(zstd_level: i32) -> FrameSealer {
        FrameSealer {
            compressor: zstd::bulk::Compressor::new(zstd_level).expect("a zstd compression context"),
            compressed: Vec::new(),
        }
    }

    /// The frame of `payload`, which holds `event_count` records.
    pub fn seal(&mut self, agent_id: &str, seq: BatchSeq, event_count: u32, payload: &[u8]) -> Vec<u8> {
        let mut compressed = std::mem::take(&mut self.compressed);
        compressed.clear();
        self.compress_append(payload, &mut compressed);
        let frame = frame_of_compressed(agent_id, seq, event_count, payload.len(), &compressed);
        self.compressed = compressed;
        frame
    }

    /// Appends `raw` to `out` as one zstd frame, compressed in place after `out`'s bytes.
    pub fn compress_append(&mut self, raw: &[u8], out: &mut Vec<u8>) {
        let at = out.len() as u64;
        out.reserve(zstd::zstd_safe::compress_bound(raw.len()));
        let mut tail = std::io::Cursor::new(out);
        tail.set_position(at);
        self.compressor
            .compress_to_buffer(raw, &mut tail)
            .expect("zstd compression into memory");
    }
}

/// The frame of a payload already compressed: `compressed` is one or more zstd frames whose
/// outputs, concatenated, are `uncompressed_len` bytes holding `event_count` records.
pub fn frame_of_compressed(
    agent_id: &str,
    seq: BatchSeq,
    event_count: u32,
    uncompressed_len: usize,
    compressed: &[u8],
) -> Vec<u8> {
    let agent = agent_id.as_bytes();
    let mut f = Vec::with_capacity(HEADER_LEN + agent.len() + compressed.len() + TRAILER_LEN);
    f.extend_from_slice(MAGIC);
    f.extend_from_slice(&VERSION.to_be_bytes());
    f.extend_from_slice(&0u16.to_be_bytes());
    f.extend_from_slice(&seq.0.to_be_bytes());
    f.extend_from_slice(&event_count.to_be_bytes());
    f.extend_from_slice(&(uncompressed_len as u32).to_be_bytes());
    f.extend_from_slice(&(compressed.len() as u32).to_be_bytes());
    f.extend_from_slice(&(agent.len() as u16).to_be_bytes());
    f.extend_from_slice(&0u16.to_be_bytes());
    f.extend_from_slice(agent);
    f.extend_from_slice(compressed);
    let crc = crc32fast::hash(&f);
    f.extend_from_slice(&crc.to_be_bytes());
    f
}

/// Checks magic, version, lengths and checksum, and reads the header. No decompression.
pub fn read_header(frame: &[u8], limits: &DecodeLimits) -> Result<FrameHeader, WireError> {
    if frame.len() > limits.max_frame_bytes {
        return Err(WireError::FrameTooLarge(frame.len(), limits.max_frame_bytes));
    }
    if frame.len() < HEADER_LEN + TRAILER_LEN {
        return Err(WireError::TooShort(frame.len()));
    }
    if &frame[0..4] != MAGIC {
        return Err(WireError::BadMagic);
    }
    let be16 = |at: usize| u16::from_be_bytes(frame[at..at + 2].try_into().expect("2 bytes"));
    let be32 = |at: usize| u32::from_be_bytes(frame[at..at + 4].try_into().expect("4 bytes"));
    let version = be16(4);
    if version != VERSION {
        return Err(WireError::UnsupportedVersion(version));
    }
    let seq = BatchSeq(u64::from_be_bytes(frame[8..16].try_into().expect("8 bytes")));
    let event_count = be32(16);
    let uncompressed_len = be32(20);
    let compressed_len = be32(24);
    let agent_len = be16(28) as usize;
    let declared = HEADER_LEN + agent_len + compressed_len as usize + TRAILER_LEN;
    if declared != frame.len() {
        return Err(WireError::LengthMismatch {
            declared,
            actual: frame.len(),
        });
    }
    let body_end = frame.len() - TRAILER_LEN;
    let crc = u32::from_be_bytes(frame[body_end..].try_into().expect("4 bytes"));
    if crc32fast::hash(&frame[..body_end]) != crc {
        return Err(WireError::Checksum);
    }
    let agent_id = std::str::from_utf8(&frame[HEADER_LEN..HEADER_LEN + agent_len])
        .ok()
        .filter(|a| !a.is_empty() && a.len() <= crate::event::MAX_STRING_LEN)
        .ok_or(WireError::BadAgentId)?
        .to_string();
    if uncompressed_len as usize > limits.max_uncompressed_bytes {
        return Err(WireError::UncompressedTooLarge(
            uncompressed_len as usize,
            limits.max_uncompressed_bytes,
        ));
    }
    if event_count > limits.max_events {
        return Err(WireError::TooManyEvents(event_count, limits.max_events));
    }
    Ok(FrameHeader {
        version,
        seq,
        event_count,
        uncompressed_len,
        compressed_len,
        agent_id,
    })
}

/// Decompresses one or more zstd frames that must come to exactly `declared` bytes. The output
/// buffer is the declared size (the caller caps it): zstd fails rather than grow it, so a
/// zstd bomb cannot expand.
pub fn decompress_payload(compressed: &[u8], declared: usize) -> Result<Vec<u8>, WireError> {
    let mut payload = Vec::with_capacity(declared);
    let mut dec = zstd::bulk::Decompressor::new().map_err(|e| WireError::Decompress(e.to_string()))?;
    let actual = dec
        .decompress_to_buffer(compressed, &mut payload)
        .map_err(|e| WireError::Decompress(e.to_string()))?;
    if actual != declared {
        return Err(WireError::PayloadLengthMismatch { declared, actual });
    }
    Ok(payload)
}

/// Decodes a whole frame under `limits`.
pub fn decode_frame(frame: &[u8], limits: &DecodeLimits) -> Result<Batch, WireError> {
    let header = read_header(frame, limits)?;
    let start = HEADER_LEN + header.agent_id.len();
    let compressed = &frame[start..start + header.compressed_len as usize];
    let payload = decompress_payload(compressed, header.uncompressed_len as usize)?;
    let events = decode_payload(&payload, &header.agent_id, header.event_count)?;
    if events.len() as u32 != header.event_count {
        return Err(WireError::CountMismatch {
            declared: header.event_count,
            actual: events.len() as u32,
        });
    }
    Ok(Batch { header, events })
}

/// Encodes an event in the v1 layout. The field order here *is* the wire format: append new
/// fields only in a new version.
struct EventV1Ref<'a>(&'a Event);

impl Encode for EventV1Ref<'_> {
    fn encode<E: Encoder>(&self, enc: &mut E) -> Result<(), EncodeError> {
        let e = self.0;
        e.id.encode(enc)?;
        e.event_type.tag().encode(enc)?;
        e.time.encode(enc)?;
        e.license.encode(enc)?;
        e.customer.encode(enc)?;
        e.product.encode(enc)?;
        e.plan.encode(enc)?;
        e.previous_plan.encode(enc)?;
        e.region.encode(enc)?;
        e.user.encode(enc)?;
        e.domain.encode(enc)?;
        e.version.encode(enc)?;
        e.feature.encode(enc)?;
        e.machine.encode(enc)?;
        e.country.encode(enc)?;
        e.deployment.map(Deployment::tag).encode(enc)?;
        e.result.tag().encode(enc)?;
        e.expires_at.encode(enc)?;
        for v in e.usage.to_array() {
            v.encode(enc)?;
        }
        e.attrs.encode(enc)
    }
}

struct EventV1(Event);

impl<C> Decode<C> for EventV1 {
    fn decode<D: Decoder<Context = C>>(d: &mut D) -> Result<Self, DecodeError> {
        fn s<C, D: Decoder<Context = C>>(d: &mut D) -> Result<Option<String>, DecodeError> {
            Option::<String>::decode(d)
        }
        let id = String::decode(d)?;
        let event_type = EventType::from_tag(u8::decode(d)?)
            .ok_or_else(|| DecodeError::OtherString("unknown event type tag".into()))?;
        let time = i64::decode(d)?;
        let license = s(d)?;
        let customer = s(d)?;
        let product = s(d)?;
        let plan = s(d)?;
        let previous_plan = s(d)?;
        let region = s(d)?;
        let user = s(d)?;
        let domain = s(d)?;
        let version = s(d)?;
        let feature = s(d)?;
        let machine = s(d)?;
        let country = s(d)?;
        let deployment = match Option::<u8>::decode(d)? {
            None => None,
            Some(t) => {
                Some(Deployment::from_tag(t).ok_or_else(|| DecodeError::OtherString("unknown deployment tag".into()))?)
            }
        };
        let result = ResultCode::from_tag(u8::decode(d)?)
            .ok_or_else(|| DecodeError::OtherString("unknown result tag".into()))?;
        let expires_at = Option::<i64>::decode(d)?;
        let mut u = [None; 6];
        for slot in &mut u {
            *slot = Option::<u64>::decode(d)?;
        }
        let attrs = Vec::<(String, String)>::decode(d)?;
        Ok(EventV1(Event {
            id,
            event_type,
            time,
            agent_id: String::new(),
            license,
            customer,
            product,
            plan,
            previous_plan,
            region,
            user,
            domain,
            version,
            feature,
            machine,
            country,
            deployment,
            result,
            expires_at,
            usage: Usage::from_array(u),
            attrs,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample(i: u64) -> Event {
        Event {
            id: format!("evt-{i}"),
            event_type: EventType::ALL[(i as usize) % EventType::ALL.len()],
            time: 1_762_000_000_000_000_000 + i as i64 * 1_000_000,
            agent_id: "agent-a".into(),
            license: Some(format!("lic-{}", i % 97)),
            customer: Some("acme".into()),
            product: None,
            plan: Some(["free", "pro", "enterprise"][(i % 3) as usize].into()),
            previous_plan: None,
            region: Some("eu-west-1".into()),
            user: (i % 2 == 0).then(|| format!("user-{i}")),
            domain: None,
            version: Some("1.2.3".into()),
            feature: None,
            machine: Some("mf_0123456789abcdef0123456789abcdef".into()),
            country: Some("DE".into()),
            deployment: Some(Deployment::OnPrem),
            result: ResultCode::ALL[(i as usize) % ResultCode::ALL.len()],
            expires_at: (i % 5 == 0).then_some(1_800_000_000_000_000_000),
            usage: Usage {
                machines_used: Some(i % 10),
                machines_limit: Some(10),
                ..Usage::default()
            },
            attrs: if i % 7 == 0 {
                vec![("k".into(), "v".into())]
            } else {
                vec![]
            },
        }
    }

    fn frame_of(events: &[Event], seq: u64) -> Vec<u8> {
        let mut payload = Vec::new();
        for e in events {
            append_event(e, &mut payload);
        }
        seal_frame("agent-a", BatchSeq(seq), events.len() as u32, &payload, 3)
    }

    #[test]
    fn round_trip() {
        let events: Vec<Event> = (0..500).map(sample).collect();
        let frame = frame_of(&events, 42);
        let batch = decode_frame(&frame, &DecodeLimits::default()).unwrap();
        assert_eq!(batch.header.seq, BatchSeq(42));
        assert_eq!(batch.header.agent_id, "agent-a");
        assert_eq!(batch.events, events);
        // Small enough on the wire to matter: well under the 40 B/event target for this mix.
        assert!(
            frame.len() / events.len() < 40,
            "{} bytes per event",
            frame.len() / events.len()
        );
    }

    #[test]
    fn a_reused_sealer_seals_each_frame_as_a_fresh_one() {
        // Large, small, then large again: a context keeps no state from one frame to the next.
        let mut sealer = FrameSealer::new(3);
        for (seq, n) in [(1u64, 5000u64), (2, 3), (3, 0), (4, 4000)] {
            let events: Vec<Event> = (seq * 10_000..seq * 10_000 + n).map(sample).collect();
            let mut payload = Vec::new();
            for e in &events {
                append_event(e, &mut payload);
            }
            let frame = sealer.seal("agent-a", BatchSeq(seq), n as u32, &payload);
            assert_eq!(frame, frame_of(&events, seq), "frame {seq}");
            let batch = decode_frame(&frame, &DecodeLimits::default()).unwrap();
            assert_eq!(batch.events, events);
        }
    }

    #[test]
    fn a_payload_of_several_zstd_frames_decodes_as_their_concatenation() {
        let events: Vec<Event> = (0..700).map(sample).collect();
        let mut sealer = FrameSealer::new(3);
        let (mut raw, mut compressed) = (Vec::new(), Vec::new());
        // Frames of 1, 299 and 400 events, as chunks compressed one by one would give.
        for part in [&events[..1], &events[1..300], &events[300..]] {
            let mut chunk = Vec::new();
            for e in part {
                append_event(e, &mut chunk);
            }
            sealer.compress_append(&chunk, &mut compressed);
            raw.extend_from_slice(&chunk);
        }
        let frame = frame_of_compressed("agent-a", BatchSeq(7), 700, raw.len(), &compressed);
        let batch = decode_frame(&frame, &DecodeLimits::default()).unwrap();
        assert_eq!((batch.header.seq, batch.events), (BatchSeq(7), events.clone()));
        // The declared length still bounds the output of all frames together.
        let short = frame_of_compressed("agent-a", BatchSeq(7), 700, raw.len() - 1, &compressed);
        assert!(matches!(
            decode_frame(&short, &DecodeLimits::default()),
            Err(WireError::Decompress(_))
        ));
        let long = frame_of_compressed("agent-a", BatchSeq(7), 700, raw.len() + 1, &compressed);
        assert_eq!(
            decode_frame(&long, &DecodeLimits::default()).unwrap_err(),
            WireError::PayloadLengthMismatch {
                declared: raw.len() + 1,
                actual: raw.len()
            }
        );
    }

    /// Not a test: the time to seal a 5,000-event frame with a context made afresh and with
    /// one kept, alternated in one run. Run it with the glibc thresholds the agent sets:
    /// `MALLOC_MMAP_THRESHOLD_=262144 MALLOC_TRIM_THRESHOLD_=1048576 MALLOC_ARENA_MAX=2
    /// cargo test --release -p keytrail-common frame_sealer_cost -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn frame_sealer_cost() {
        let mut payload = Vec::new();
        for i in 0..5000 {
            append_event(&sample(i), &mut payload);
        }
        let mut sealer = FrameSealer::new(3);
        let (mut fresh, mut kept) = (Vec::new(), Vec::new());
        for round in 0..400 {
            let t = std::time::Instant::now();
            let frame = if round % 2 == 0 {
                seal_frame("agent-a", BatchSeq(round), 5000, &payload, 3)
            } else {
                sealer.seal("agent-a", BatchSeq(round), 5000, &payload)
            };
            let us = t.elapsed().as_secs_f64() * 1e6;
            std::hint::black_box(frame);
            if round >= 20 {
                if round % 2 == 0 {
                    fresh.push(us)
                } else {
                    kept.push(us)
                }
            }
        }
        let median = |v: &mut Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        println!(
            "sealing {} payload bytes (5,000 events): fresh context {:.0} us, kept context {:.0} us (medians)",
            payload.len(),
            median(&mut fresh),
            median(&mut kept)
        );
    }

    #[test]
    fn record_spans_cut_payload_at_event_boundaries() {
        let mut payload = Vec::new();
        for i in 0..10 {
            append_event(&sample(i), &mut payload);
        }
        let spans = record_spans(&payload).unwrap();
        assert_eq!(spans.len(), 10);
        let (off, _) = spans[4];
        let tail = decode_payload(&payload[off..], "x", 100).unwrap();
        assert_eq!(tail.len(), 6);
        assert_eq!(tail[0].id, "evt-4");
        assert!(record_spans(&payload[..payload.len() - 1]).is_err());
    }

    #[test]
    fn every_corruption_is_refused() {
        let frame = frame_of(&(0..50).map(sample).collect::<Vec<_>>(), 1);
        let limits = DecodeLimits::default();
        for i in 0..frame.len() {
            let mut bad = frame.clone();
            bad[i] ^= 0x5a;
            assert!(decode_frame(&bad, &limits).is_err(), "flipping byte {i} went unnoticed");
        }
        for cut in [0, 10, HEADER_LEN, frame.len() - 1] {
            assert!(decode_frame(&frame[..cut], &limits).is_err());
        }
    }

    #[test]
    fn caps_are_checked_before_decompression() {
        let events: Vec<Event> = (0..100).map(sample).collect();
        let frame = frame_of(&events, 1);
        let small = DecodeLimits {
            max_uncompressed_bytes: 100,
            ..DecodeLimits::default()
        };
        assert!(matches!(
            decode_frame(&frame, &small),
            Err(WireError::UncompressedTooLarge(..))
        ));
        let few = DecodeLimits {
            max_events: 10,
            ..DecodeLimits::default()
        };
        assert!(matches!(
            decode_frame(&frame, &few),
            Err(WireError::TooManyEvents(100, 10))
        ));
        let tiny = DecodeLimits {
            max_frame_bytes: 64,
            ..DecodeLimits::default()
        };
        assert!(matches!(decode_frame(&frame, &tiny), Err(WireError::FrameTooLarge(..))));
    }

    #[test]
    fn zstd_bomb_with_lying_length_is_refused() {
        // 8 MiB of zeros compresses to a few hundred bytes; the header claims 1 KiB.
        let zeros = vec![0u8; 8 << 20];
        let compressed = zstd::bulk::compress(&zeros, 3).unwrap();
        let mut f = Vec::new();
        f.extend_from_slice(MAGIC);
        f.extend_from_slice(&VERSION.to_be_bytes());
        f.extend_from_slice(&0u16.to_be_bytes());
        f.extend_from_slice(&1u64.to_be_bytes());
        f.extend_from_slice(&1u32.to_be_bytes());
        f.extend_from_slice(&1024u32.to_be_bytes());
        f.extend_from_slice(&(compressed.len() as u32).to_be_bytes());
        f.extend_from_slice(&1u16.to_be_bytes());
        f.extend_from_slice(&0u16.to_be_bytes());
        f.push(b'a');
        f.extend_from_slice(&compressed);
        let crc = crc32fast::hash(&f);
        f.extend_from_slice(&crc.to_be_bytes());
        assert!(matches!(
            decode_frame(&f, &DecodeLimits::default()),
            Err(WireError::Decompress(_))
        ));
    }

    #[test]
    fn lying_count_and_unknown_version_are_refused() {
        let events: Vec<Event> = (0..3).map(sample).collect();
        let mut payload = Vec::new();
        for e in &events {
            append_event(e, &mut payload);
        }
        let lying = seal_frame("agent-a", BatchSeq(1), 5, &payload, 3);
        assert!(matches!(
            decode_frame(&lying, &DecodeLimits::default()),
            Err(WireError::CountMismatch { declared: 5, actual: 3 })
        ));
        let over = seal_frame("agent-a", BatchSeq(1), 2, &payload, 3);
        assert!(matches!(
            decode_frame(&over, &DecodeLimits::default()),
            Err(WireError::TooManyEvents(3, 2))
        ));
        let mut v2 = frame_of(&events, 1);
        v2[5] = 2;
        let end = v2.len() - 4;
        let crc = crc32fast::hash(&v2[..end]);
        v2[end..].copy_from_slice(&crc.to_be_bytes());
        assert_eq!(
            decode_frame(&v2, &DecodeLimits::default()),
            Err(WireError::UnsupportedVersion(2))
        );
    }
}
