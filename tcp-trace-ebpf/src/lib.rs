#![no_std]
//! Exists so that tcp-trace can name this crate as a build-dependency (see tcp-trace/build.rs).
