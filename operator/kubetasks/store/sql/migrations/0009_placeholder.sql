-- TEMPORARY: stands in for the handlers' 0009 (issue 13) until it lands on main; dropped at rebase.
SELECT 1;
