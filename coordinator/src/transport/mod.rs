//! The coordinator's side of the QUIC link: its CA, enrollment tokens, and the server that
//! authenticates clients and carries their sessions.

pub mod enroll;
pub mod pki;
pub mod revoke;
pub mod server;

pub use enroll::Tokens;
pub use pki::Pki;
pub use revoke::{Revocation, Revoked};
