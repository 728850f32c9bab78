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
//! The protocol itself is described in `PROTOCOL.md` and [`protocol`].
#![warn(missing_docs)]

mod client;
pub mod core;
mod error;
pub mod io;
pub mod protocol;
pub mod topic;

pub use client::{Client, ClientOptions, Event, PendingAck, Subscription, View};
pub use error::Error;
pub use protocol::{Message, PubSeq, PublisherId, Reports, Seq, SlowPolicy};
