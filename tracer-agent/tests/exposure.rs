//! Root integration test: the agent's own endpoint (`/metrics`, `/connections`)
//! has no authentication, so an address other than loopback is said loudly at
//! start, and loopback is not.

mod support;

use support::*;

const WARNING: &str = "not loopback: /metrics and /connections";

#[test]
fn an_endpoint_beyond_loopback_is_warned_about_and_loopback_is_not() {
    if !require_root("exposure") {
        return;
    }
    for (listen, warned) in [
        (format!("0.0.0.0:{}", free_port()), true),
        (format!("127.0.0.1:{}", free_port()), false),
    ] {
        let agent = Agent::start_listening(&listen, &[], &[], &["--output", "json"]);
        // The endpoint answers either way: the warning is the only difference.
        let metrics = agent.get("/metrics");
        assert!(metrics.starts_with("HTTP/1.0 200"), "{listen}: {metrics}");
        let (_, stderr) = agent.stop();
        let log = stderr.text();
        assert_eq!(log.contains(WARNING), warned, "{listen}:\n{log}");
        if warned {
            assert!(
                log.contains(&listen),
                "the warning names the address:\n{log}"
            );
        }
    }
}
