//! memplan: how much GPU and host memory an LLM training plan needs, and whether it fits.
//!
//! The crate has separate rooms with little traffic between them:
//! - [`profiles`] and [`plan`]: model and GPU profiles, and the one place where user input
//!   becomes a validated [`plan::Plan`];
//! - [`estimate`]: the analytic estimator, pure arithmetic over `&Plan`;
//! - [`output`]: tables, JSON, markdown and PyTorch memory_viz snapshots; renders;
//! - [`allocator`]: a simulation of PyTorch's CUDA caching allocator (replays alloc/free
//!   events, reports reserved bytes), the ground for reserved memory without a fitted constant;
//! - [`trace`]: a step as ordered allocation events, predicted or measured, the common
//!   ground of the timeline picture, the memory_viz snapshot and the allocator simulation;
//! - [`cli`]: flags and commands;
//! - `trainer` (cargo feature `trainer`): a real libtorch run that measures what the
//!   estimator predicts. The estimator and the trainer never import each other; only the
//!   validation command sees both.

pub mod allocator;
pub mod cli;
pub mod error;
pub mod estimate;
pub mod input;
pub mod output;
pub mod plan;
pub mod profiles;
pub mod search;
pub mod torchtitan;
pub mod trace;
#[cfg(feature = "trainer")]
pub mod trainer;
pub mod units;
#[cfg(feature = "trainer")]
pub mod validate;
pub mod zero;
