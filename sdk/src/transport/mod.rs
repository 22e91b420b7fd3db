//! The client side of the QUIC link: enrollment, mutual-TLS sessions, and taking part in
//! rounds with a [`Scorer`].

pub mod client;
pub mod tls;

pub use client::{Event, Scorer, Session, enroll, participate, sample_scores};
pub use tls::{EnrollToken, Identity};
