//! The SDK's error type.

use crate::protocol::{CallFailure, ErrorCode};
use crate::topic::TopicError;

/// What can go wrong for a Canopy client.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// No server in the list could be reached within the reconnect time.
    #[error("cannot reach any Canopy server of [{servers}]: {last}")]
    Unreachable {
        /// The addresses tried.
        servers: String,
        /// The last failure.
        last: String,
    },
    /// A server rejected what this client sent; retrying will not help.
    #[error("server rejected the client ({code:?}): {message}")]
    Rejected {
        /// The server's error code.
        code: ErrorCode,
        /// The server's explanation.
        message: String,
    },
    /// A topic or pattern is not valid.
    #[error("invalid topic or pattern: {0}")]
    Topic(#[from] TopicError),
    /// A payload is larger than a frame may carry.
    #[error("payload of {len} bytes is larger than the {max}-byte limit")]
    PayloadTooLarge {
        /// The payload length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The server broke the protocol (a bug or a wrong address).
    #[error("server broke the protocol: {0}")]
    Protocol(String),
    /// A call failed as the core's group decided: unknown method, the
    /// handler's error, no replicated service, or a reply no longer held.
    #[error("call failed ({:?}): {}", .0.code, .0.message)]
    Call(CallFailure),
    /// No reply within the call timeout, while the servers said they are
    /// not in a primary view (the core has lost its majority).
    #[error("no reply to `{method}` within {waited:?}: no server is in a primary view")]
    NoPrimary {
        /// The method called.
        method: String,
        /// How long the call waited.
        waited: std::time::Duration,
    },
    /// No reply within the call timeout. The call may still be executed;
    /// calling again is a new call.
    #[error("no reply to `{method}` within {waited:?}")]
    CallTimeout {
        /// The method called.
        method: String,
        /// How long the call waited.
        waited: std::time::Duration,
    },
    /// The user may not publish this, call this, or subscribe to this
    /// (its permissions, as the server said them): nothing was sent, and
    /// the client goes on.
    #[error("permission denied: {0}")]
    Denied(String),
    /// The client was closed, or failed earlier with another error.
    #[error("client is closed")]
    Closed,
}
