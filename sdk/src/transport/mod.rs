//! The client side of the QUIC link: enrollment, mutual-TLS sessions and their events. The
//! round loop that drives a session is [`crate::rounds`].

pub mod backoff;
pub mod client;
pub mod tls;

pub use backoff::{Backoff, Reconnect};
pub use client::{Event, Session, enroll, sample_scores};
pub use tls::{EnrollToken, Identity};
