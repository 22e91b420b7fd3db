//! `uniffi-bindgen`: generates foreign-language bindings from the built `crosslm_ffi`
//! library (library mode), with the same uniffi version the library was built with.

fn main() {
    uniffi::uniffi_bindgen_main()
}
