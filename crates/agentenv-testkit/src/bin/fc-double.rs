//! `fc-double`: a test double of the Firecracker binary's API. See
//! [`agentenv_testkit::fc_double`] for its command line.

fn main() {
    agentenv_testkit::fc_double::main()
}
