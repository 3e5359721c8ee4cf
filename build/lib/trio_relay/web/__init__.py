"""Static files of the web dashboard (served at /)."""
