//! Runs the Consul HTTP API simulator used by the tests, standalone, so that other Consul
//! clients can be pointed at it.
//!
//! ```text
//! cargo run --example consul_sim -- [PORT] [--token TOKEN]
//! ```
//!
//! It listens on `127.0.0.1:PORT` (default 8500) until interrupted. With `--token`, every
//! request must carry that ACL token. Only loopback addresses are used.

#[path = "../tests/support/consul_sim/mod.rs"]
mod consul_sim;

use std::net::SocketAddr;

fn main() {
    let mut port: u16 = 8500;
    let mut token = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--token" => token = args.next(),
            "-h" | "--help" => {
                println!("usage: consul_sim [PORT] [--token TOKEN]");
                return;
            }
            p => match p.parse() {
                Ok(p) => port = p,
                Err(_) => {
                    eprintln!("not a port: {p:?}; usage: consul_sim [PORT] [--token TOKEN]");
                    std::process::exit(2);
                }
            },
        }
    }
    let opts = consul_sim::SimOptions {
        addr: SocketAddr::from(([127, 0, 0, 1], port)),
        acl_token: token,
    };
    let sim = match consul_sim::ConsulSim::start_with(opts) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("cannot listen on 127.0.0.1:{port}: {e}");
            std::process::exit(1);
        }
    };
    // Printed for scripts that wait for readiness.
    println!("consul simulator listening on http://{}", sim.addr());
    loop {
        std::thread::park();
    }
}
