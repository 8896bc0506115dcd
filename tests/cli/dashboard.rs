//! The dashboard in a real headless Chromium, against a real `ccluster serve`.
