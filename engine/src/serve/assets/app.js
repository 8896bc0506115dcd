// The dashboard (filled in by the dashboard work).
