//! Fuzz target: arbitrary bytes through the whole compiler (TOML and KDL, validate and plan) and the
//! diagnostic renderer. Any panic is a bug: bad input must only ever produce diagnostics.
#![no_main]

use std::path::Path;

use ccluster_engine::plan::InputArgs;
use ccluster_engine::syntax::Format;
use ccluster_engine::{compile, render, SourceFile, Stage};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let source = SourceFile::new("fuzz.toml", text);
    for format in [Format::Toml, Format::Kdl] {
        for stage in [Stage::Validate, Stage::Plan] {
            match compile(&source, format, Path::new("/nonexistent"), &InputArgs::default(), stage) {
                Ok(compiled) => {
                    let _ = ccluster_engine::plan::to_json(&compiled.plan);
                    let _ = ccluster_engine::plan::to_text(&compiled.plan);
                }
                Err(diagnostics) => {
                    let _ = render::human(&diagnostics, &source, false);
                }
            }
        }
    }
});
