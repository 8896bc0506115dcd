//! `state export` and `state import`: a run's state as one portable archive, to resume it in
//! another clone (a CI job on another machine). The archive itself is the engine's
//! (`store::portable`); this module resolves arguments, prints and picks exit codes.

use std::path::Path;

use ccluster_engine::store::{self, PortableError, Store, StoreError};

use crate::exit;
use crate::runs::{find_run, load_runs};

/// `ccluster state export RUN FILE`.
pub fn export(dir: &Path, run: &str, file: &Path) -> u8 {
    let view = match load_runs(dir).and_then(|v| find_run(v, Some(run))) {
        Ok(v) => v,
        Err(code) => return code,
    };
    if view.live {
        eprintln!(
            "error: run {} is in progress in another process; export it when that process ends",
            view.run.id
        );
        return exit::INVALID_INPUT;
    }
    // A destination that cannot be written is said before anything is read.
    let parent = match file.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if !parent.is_dir() {
        eprintln!(
            "error: cannot write `{}`: the directory `{}` does not exist",
            file.display(),
            parent.display()
        );
        return exit::INVALID_INPUT;
    }
    let store = match Store::open_reader(dir) {
        Ok(s) => s,
        Err(StoreError::Locked { pid, .. }) => {
            eprintln!(
                "error: another ccluster process (pid {pid}) is driving the state in `{}`",
                dir.display()
            );
            eprintln!("  help: export when it ends: the archive is read from the database");
            return exit::INVALID_INPUT;
        }
        Err(e) => return crate::runs::report(e),
    };
    match store::export_run(&store, &view.run, file) {
        Ok(done) => {
            let refs = done.manifest.refs.len();
            eprintln!(
                "exported run {} ({} entries, {} ref{}, {} bytes) to {}",
                done.manifest.run,
                done.manifest.entries.len(),
                refs,
                if refs == 1 { "" } else { "s" },
                done.bytes,
                file.display()
            );
            exit::SUCCESS
        }
        Err(e) => fail(e),
    }
}

/// `ccluster state import FILE`.
pub fn import(dir: &Path, file: &Path, repo: &Path, force: bool) -> u8 {
    // Everything is checked before anything is written.
    let archive = match store::read_archive(file) {
        Ok(a) => a,
        Err(e) => return fail(e),
    };
    let checked = match archive.bundle.is_some() || archive.manifest.base.is_some() {
        true => match store::check_repo(&archive, repo) {
            Ok(c) => Some(c),
            Err(e) => return fail(e),
        },
        false => None,
    };
    let run = archive.manifest.run.clone();
    // Worth knowing before `apply`: an edited clusterfile runs again what its edit changed.
    let recorded = std::path::PathBuf::from(&archive.manifest.clusterfile);
    let edited = std::fs::read(&recorded)
        .ok()
        .filter(|text| store::sha256_hex(text) != archive.manifest.clusterfile_sha256);
    match store::import(dir, archive, checked, force) {
        Ok(done) => {
            eprintln!(
                "imported run {}{} into {}: {} file{}, {} cache entr{}, {} ref{}",
                done.run,
                if done.replaced { " (replacing it)" } else { "" },
                dir.display(),
                done.files,
                if done.files == 1 { "" } else { "s" },
                done.cache_entries,
                if done.cache_entries == 1 { "y" } else { "ies" },
                done.refs,
                if done.refs == 1 { "" } else { "s" },
            );
            eprintln!("  resume it: ccluster apply (what finished is cached)");
            if edited.is_some() {
                eprintln!(
                    "note: {} differs from the text run {} recorded: tasks whose definition changed will run again",
                    recorded.display(),
                    done.run
                );
            }
            exit::SUCCESS
        }
        Err(PortableError::Exists { .. }) => {
            eprintln!(
                "error: the state in `{}` already has run {run}; nothing was imported",
                dir.display()
            );
            eprintln!("  help: `--force` replaces that run's records and files with the archive's");
            exit::INVALID_INPUT
        }
        Err(e) => fail(e),
    }
}

fn fail(e: PortableError) -> u8 {
    let refusal = e.is_refusal();
    match e {
        PortableError::Store(e) => {
            eprintln!("error: {e}");
            if let StoreError::Locked { .. } = e {
                eprintln!("  help: import when it ends; nothing was imported");
            }
        }
        e @ (PortableError::Damaged { .. }
        | PortableError::NotAnArchive { .. }
        | PortableError::Unreadable { .. }
        | PortableError::Version { .. }) => {
            eprintln!("error: {e}");
            eprintln!("  help: nothing was changed; export the run again from its state");
        }
        e => {
            eprintln!("error: {e}");
            if refusal {
                eprintln!("  help: nothing was changed");
            }
        }
    }
    if refusal {
        exit::INVALID_INPUT
    } else {
        exit::TASK_FAILED
    }
}
