//! TEMPORARY stand-in for the run's git endpoint.
pub fn fetch_script(git_url: &str, token_var: &str, start_ref: &str, dir: &str) -> String {
    let _ = (git_url, token_var, start_ref, dir);
    String::new()
}
pub fn push_script(git_url: &str, token_var: &str, run: &str, name: &str, dir: &str) -> String {
    let _ = (git_url, token_var, run, name, dir);
    String::new()
}
