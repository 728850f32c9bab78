//! `canopy-client`: the Canopy wire protocol and an async client SDK.
//!
//! Canopy is a pub/sub broker that puts every published message into one
//! total order and fans it out to subscribers, who can resume by sequence
//! number after a reconnect with nothing lost and nothing doubled.
//!
//! ```no_run
//! use canopy_client::{Client, ClientOptions, Event};
//! use futures::StreamExt;
//!
//! # async fn demo() -> Result<(), canopy_client::Error> {
//! let client = Client::connect(ClientOptions::new(["127.0.0.1:4400"])).await?;
//! let mut prices = client.subscribe("md.NASDAQ.*").await?;
//! client.publish("md.NASDAQ.AAPL", "189.12").await?;
//! while let Some(event) = prices.next().await {
//!     match event {
//!         Event::Message(m) => println!("{} {} {:?}", m.seq, m.topic(), m.payload),
//!         Event::Gap { from, to } => eprintln!("missed {from}..={to}"),
//!         Event::StreamReset => eprintln!("the server lost its stream; sequence numbers restart"),
//!         // Only with `full` membership reports (ClientOptions::reports).
//!         Event::View(v) => println!("{} clients at seq {}", v.clients.len(), v.seq),
//!         // Only with weak delivery (ClientOptions::weak).
//!         Event::Diverged { from, .. } => eprintln!("what came from {from} on is replaced"),
//!     }
//! }
//! # Ok(()) }
//! ```
//!
//! The protocol itself is described in `PROTOCOL.md` and [`protocol`]. The
//! client side of it is [`core`], sans-IO state machines that `Client` (and
//! Canopy's relays and simulators) run; with `default-features = false` the
//! crate is the protocol and that core alone, without tokio (the `tokio`
//! feature, on by default, adds the async `Client`).
#![warn(missing_docs)]

#[cfg(feature = "tokio")]
mod acks;
#[cfg(feature = "tokio")]
mod client;
pub mod core;
mod error;
#[cfg(feature = "tokio")]
pub mod io;
pub mod permissions;
pub mod protocol;
#[cfg(feature = "tokio")]
pub mod tls;
pub mod topic;

#[cfg(feature = "tokio")]
pub use client::{Client, ClientOptions, Event, PendingAck, Subscription, View};
pub use error::Error;
pub use protocol::{Message, PubSeq, PublisherId, Replies, Reports, Seq, SlowPolicy, Vote};
