//! Build script: only with the `trainer` feature, compiles the small C++ shim in `csrc/`
//! against libtorch and links the binary so that CUDA is usable when libtorch has it.
//!
//! torch-sys (links = "tch") exports libtorch's lib folder to its direct dependents as
//! `DEP_TCH_LIBTORCH_LIB`; the headers are in the `include` folder next to it. rustc links with
//! `--as-needed`, which would drop libtorch_cuda.so (nothing references it by symbol), so it is
//! linked with `--no-as-needed` when present. An rpath to libtorch's lib folder lets the test
//! and release binaries run without `LD_LIBRARY_PATH`.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=CARGO_FEATURE_TRAINER");
    if std::env::var_os("CARGO_FEATURE_TRAINER").is_some() {
        #[cfg(feature = "trainer")]
        trainer::build();
    }
}

#[cfg(feature = "trainer")]
mod trainer {
    use std::path::PathBuf;

    pub fn build() {
        println!("cargo:rerun-if-changed=csrc");
        println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
        let lib =
            PathBuf::from(std::env::var("DEP_TCH_LIBTORCH_LIB").expect(
                "torch-sys did not export DEP_TCH_LIBTORCH_LIB (is the tch dependency on?)",
            ));
        let root = lib
            .parent()
            .expect("libtorch lib folder has a parent")
            .to_path_buf();
        let include = root.join("include");
        let api_include = include.join("torch/csrc/api/include");

        let mut sources: Vec<PathBuf> = std::fs::read_dir("csrc")
            .expect("csrc/ exists")
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "cpp"))
            .collect();
        sources.sort();
        for s in &sources {
            println!("cargo:rerun-if-changed={}", s.display());
        }

        // libtorch from pip is built with the C++11 ABI since 2.6; torch-sys asks Python, here
        // the manylinux wheels (2.11) all use it.
        let abi = std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".into());
        let mut build = cc::Build::new();
        // NCCL process groups (csrc/dist.cpp) need libtorch_cuda, NCCL's header and the CUDA
        // runtime headers; the CUDA wheel of torch brings all three as pip packages
        // (nvidia-nccl-cu13, nvidia-cuda-runtime), in site-packages/nvidia next to torch.
        // Without them (the CPU wheel) the shim is built without NCCL and says so when asked.
        let nvidia = root.parent().map(|sp| sp.join("nvidia"));
        let find = |rel: &str| -> Option<PathBuf> {
            let nvidia = nvidia.as_ref()?;
            let mut dirs: Vec<PathBuf> = std::fs::read_dir(nvidia)
                .ok()?
                .filter_map(|e| e.ok().map(|e| e.path().join("include")))
                .filter(|d| d.join(rel).exists())
                .collect();
            dirs.sort();
            dirs.pop()
        };
        // cuda_runtime.h also needs the CUDA C runtime's host headers (crt/) and CCCL's
        // (nv/target), which the runtime wheel leaves to nvidia-cuda-crt and nvidia-cuda-cccl;
        // scripts/libtorch-env.sh installs the versions matching torch's CUDA.
        if let (true, Some(nccl), Some(cuda), Some(_), Some(_)) = (
            lib.join("libtorch_cuda.so").exists(),
            find("nccl.h"),
            find("cuda_runtime_api.h"),
            find("crt/host_config.h"),
            find("nv/target"),
        ) {
            build
                .include(nccl)
                .include(cuda)
                .define("USE_C10D_NCCL", None)
                .define("MEMPLAN_NCCL", None);
            println!("cargo:rustc-cfg=memplan_nccl");
        }
        println!("cargo::rustc-check-cfg=cfg(memplan_nccl)");
        // The CUDA caching allocator's history, for measured traces of a CUDA run
        // (csrc/shim.cpp), needs libtorch_cuda only.
        if lib.join("libtorch_cuda.so").exists() {
            build.define("MEMPLAN_CUDA_TRACE", None);
        }
        build
            .cpp(true)
            .pic(true)
            .warnings(false)
            .include(&include)
            .include(&api_include)
            // gloo's headers for ProcessGroupGloo.hpp (csrc/third_party/gloo/README.md), and
            // the define without which that header declares nothing.
            .include("csrc/third_party")
            .define("USE_C10D_GLOO", None)
            .flag("-std=c++17")
            .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={abi}"))
            .flag("-DGLOG_USE_GLOG_EXPORT")
            .files(&sources)
            .compile("memplan_shim");

        println!("cargo:rustc-link-search=native={}", lib.display());
        println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
        if lib.join("libtorch_cuda.so").exists() {
            println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
            println!("cargo:rustc-link-arg=-ltorch_cuda");
            println!("cargo:rustc-link-arg=-ltorch");
            println!("cargo:rustc-link-arg=-Wl,--as-needed");
        }
        println!("cargo:rustc-link-lib=dylib=torch_cpu");
        println!("cargo:rustc-link-lib=dylib=c10");
    }
}
