//! The `flannel` CNI plugin binary; all logic lives in [`flannel_agent::cni`].

fn main() -> std::process::ExitCode {
    flannel_agent::cni::main()
}
