#![allow(dead_code, unused_imports)]

pub mod fairness;
pub mod fake_api;
pub mod logs;
pub mod openbao;
pub mod operator;
pub mod shop;

pub use logs::capture_logs;
