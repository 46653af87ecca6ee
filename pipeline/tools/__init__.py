"""User tools around the job: demo data, preview contact sheets."""
