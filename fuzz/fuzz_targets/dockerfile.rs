//! The Dockerfile parser, global ARGs, the stage graph and dispatch of every instruction:
//! any input gives a value or an error, never a panic, a hang or a stack overflow.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rbuild_dag::dispatch::{resolve_global_args, ImageState, StageDispatcher};
use std::collections::BTreeMap;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let Ok(src) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(df) = rbuild_dag::parse(src, Path::new("Dockerfile")) else {
        return;
    };
    let Ok(args) = resolve_global_args(&df, &BTreeMap::new()) else {
        return;
    };
    let _ = rbuild_dag::plan(&df, None, &args);
    for st in &df.stages {
        let mut d = StageDispatcher::new(
            ImageState::default(),
            &args,
            &BTreeMap::new(),
            df.directives.escape,
        );
        for i in &st.instructions {
            let _ = d.dispatch(i);
        }
    }
});
