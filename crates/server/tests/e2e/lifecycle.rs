//! SIGHUP reload and SIGTERM drain of the real process.

use std::time::{Duration, Instant};

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_rejects_bad_files_and_applies_good_ones_without_failures() {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let lb = Lb::start(&http_config("strategy = \"round_robin\"", &[&a], &[1]));
    let addr = lb.addr("web");
    let load = Load::start(addr, 4, Duration::ZERO);
    tokio::time::sleep(Duration::from_millis(300)).await;

    // An invalid file: rejected, the old routes keep answering.
    std::fs::write(&lb.config_path, "[[listener]]\nname = 1\n").unwrap();
    lb.signal("HUP");
    lb.wait_log("rejected reload", Duration::from_secs(5), |v| {
        v["result"] == "failure"
            && v["message"]
                .as_str()
                .is_some_and(|m| m.contains("rejected"))
    })
    .await;
    let (status, body) = get(&client(), addr, "/").await.unwrap();
    assert_eq!((status, body.as_str()), (200, "a"));

    // A valid file adding instance b: b gets traffic.
    std::fs::write(
        &lb.config_path,
        http_config("strategy = \"round_robin\"", &[&a, &b], &[1, 1]),
    )
    .unwrap();
    lb.signal("HUP");
    lb.wait_log("applied reload", Duration::from_secs(5), |v| {
        v["result"] == "success"
    })
    .await;
    let t = Instant::now();
    while !load.has_seen("b") {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "b never got traffic after the reload"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (_, failed) = load.stop().await;
    assert_eq!(failed, 0, "no request may fail across reloads");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_with_an_unreadable_file_logs_why_and_keeps_the_old_config() {
    let a = Backend::start("a").await;
    let config = http_config("", &[&a], &[1]);
    let lb = Lb::start(&config);
    let addr = lb.addr("web");
    // A directory where the file was: unreadable even for root, whom file
    // permissions would not stop.
    std::fs::remove_file(&lb.config_path).unwrap();
    std::fs::create_dir(&lb.config_path).unwrap();
    lb.signal("HUP");
    let path = lb.config_path.display().to_string();
    lb.wait_log(
        "the rejected reload with its reason",
        Duration::from_secs(5),
        |v| {
            v["result"] == "failure"
            && v["message"]
                .as_str()
                .is_some_and(|m| m.contains("reload rejected"))
            // The reason names the file and what the OS said.
            && v["reason"].as_str().is_some_and(|r| {
                r.starts_with(&format!("{path}: cannot read: ")) && r.contains("directory")
            })
        },
    )
    .await;
    let (status, body) = get(&client(), addr, "/").await.unwrap();
    assert_eq!((status, body.as_str()), (200, "a"), "the old config serves");

    // Readable again: the next SIGHUP applies it.
    std::fs::remove_dir(&lb.config_path).unwrap();
    std::fs::write(&lb.config_path, with_free_admin(&config)).unwrap();
    lb.signal("HUP");
    lb.wait_log("the applied reload", Duration::from_secs(5), |v| {
        v["result"] == "success"
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_requests_and_exits_zero() {
    let a = Backend::start("a").await;
    a.set_delay(Duration::from_millis(600));
    let mut lb = Lb::start(&http_config("", &[&a], &[1]));
    let addr = lb.addr("web");
    let mut in_flight = Vec::new();
    for _ in 0..10 {
        in_flight.push(tokio::spawn(
            async move { get(&client(), addr, "/slow").await },
        ));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let t = Instant::now();
    lb.signal("TERM");
    for r in in_flight {
        let (status, body) = r.await.unwrap().unwrap();
        assert_eq!(
            (status, body.as_str()),
            (200, "a"),
            "an in-flight request was dropped"
        );
    }
    let status = lb.wait_exit(Duration::from_secs(5));
    assert!(status.success(), "exit status {status:?}");
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "drain took {:?} (drain_timeout 5s)",
        t.elapsed()
    );
    // New connections are refused once draining.
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}
