//! The threads of `run` (issue 12): under thread per core the control
//! plane has a runtime of its own, off the workers and off the main thread.

use std::collections::HashMap;
use std::time::Duration;

use crate::support::*;

/// Starts `datapunk-lb run --threads N` on a config with one listener and
/// one service, in the default model (thread per core above one thread,
/// whatever the environment asks), and returns it once it is running.
fn run_with_threads(threads: &str) -> std::process::Child {
    let config_path = temp_path("threads.toml");
    let config = format!(
        "[[listener]]\nname = \"web\"\nlisten = \"127.0.0.1:0\"\nprotocol = \"http\"\n\
         [[listener.route]]\npath_prefix = \"/\"\nservice = \"api\"\n{}",
        unchecked_service("api", "a", 9)
    );
    std::fs::write(&config_path, with_free_admin(&config)).unwrap();
    let mut child = lb_command(&["run", "--threads", threads, "--config"])
        .arg(&config_path)
        .env_remove("DATAPUNK_LB_SHARED_RUNTIME")
        .env_remove("DATAPUNK_LB_THREAD_PER_CORE")
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    read_json_log(&mut child, "lb", move |v| {
        if v["message"] == "datapunk-lb running" {
            let _ = tx.send(());
        }
    });
    rx.recv_timeout(Duration::from_secs(20))
        .expect("datapunk-lb did not start");
    child
}

/// How many threads of `pid` have each name (`comm`, cut to 15 bytes by
/// the kernel: "datapunk-worker", "datapunk-contro").
fn thread_names(pid: u32) -> HashMap<String, usize> {
    let mut names = HashMap::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let comm = std::fs::read_to_string(task.unwrap().path().join("comm")).unwrap();
        *names.entry(comm.trim().to_owned()).or_insert(0) += 1;
    }
    names
}

#[test]
fn thread_per_core_runs_the_control_plane_on_two_threads_of_its_own() {
    if !std::path::Path::new("/proc/self/task").exists() {
        eprintln!("skipped: no /proc/<pid>/task to list the threads");
        return;
    }
    let mut lb = run_with_threads("2");
    // A thread names itself once it runs: the last worker may be listed
    // under the process's name for a moment after the listener is up.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let names = loop {
        let names = thread_names(lb.id());
        if names.get("datapunk-worker").copied().unwrap_or(0) >= 2
            || std::time::Instant::now() >= deadline
        {
            break names;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let count = |name: &str| names.get(name).copied().unwrap_or(0);
    // Two workers, and the control runtime's two threads beside them (its
    // blocking pool, which shares the name, may have started more).
    assert_eq!(count("datapunk-worker"), 2, "{names:?}");
    assert!(count("datapunk-contro") >= 2, "{names:?}");
    let _ = lb.kill();
    let _ = lb.wait();

    // One thread: one single-threaded runtime serves everything.
    let mut lb = run_with_threads("1");
    let names = thread_names(lb.id());
    assert!(
        !names.contains_key("datapunk-worker") && !names.contains_key("datapunk-contro"),
        "{names:?}"
    );
    let _ = lb.kill();
    let _ = lb.wait();
}
