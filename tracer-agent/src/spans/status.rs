//! Status descriptions of error spans. Each is fixed text chosen from the error's
//! code, never the peer's own message (a database's error text can echo the values
//! of a query, an HTTP reason phrase is whatever the server wrote).

/// The standard reason phrase of an HTTP status code (RFC 9110), if it has one.
pub fn http(status: u16) -> Option<&'static str> {
    Some(match status {
        400 => "Bad Request",
        401 => "Unauthorized",
        402 => "Payment Required",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        406 => "Not Acceptable",
        407 => "Proxy Authentication Required",
        408 => "Request Timeout",
        409 => "Conflict",
        410 => "Gone",
        411 => "Length Required",
        412 => "Precondition Failed",
        413 => "Content Too Large",
        414 => "URI Too Long",
        415 => "Unsupported Media Type",
        416 => "Range Not Satisfiable",
        417 => "Expectation Failed",
        421 => "Misdirected Request",
        422 => "Unprocessable Content",
        423 => "Locked",
        424 => "Failed Dependency",
        425 => "Too Early",
        426 => "Upgrade Required",
        428 => "Precondition Required",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        451 => "Unavailable For Legal Reasons",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        505 => "HTTP Version Not Supported",
        506 => "Variant Also Negotiates",
        507 => "Insufficient Storage",
        508 => "Loop Detected",
        511 => "Network Authentication Required",
        _ => return None,
    })
}

/// The description of an exchange the connection's close ended before a response
/// (`error.type` `timeout`, `client_closed` or `connection_closed`).
pub fn abandoned(error_type: &str) -> &'static str {
    match error_type {
        "timeout" => "the client closed the connection before the response came",
        "client_closed" => "the client closed the connection before the response was sent",
        _ => "the connection closed before the response",
    }
}

/// The PostgreSQL condition name of a SQLSTATE (PostgreSQL's errcodes), else the
/// name of its class.
pub fn postgres(sqlstate: &str) -> Option<&'static str> {
    let exact = match sqlstate {
        "01000" => "warning",
        "08000" => "connection_exception",
        "08003" => "connection_does_not_exist",
        "08006" => "connection_failure",
        "08001" => "sqlclient_unable_to_establish_sqlconnection",
        "08004" => "sqlserver_rejected_establishment_of_sqlconnection",
        "08P01" => "protocol_violation",
        "0A000" => "feature_not_supported",
        "21000" => "cardinality_violation",
        "22000" => "data_exception",
        "22001" => "string_data_right_truncation",
        "22003" => "numeric_value_out_of_range",
        "22007" => "invalid_datetime_format",
        "22008" => "datetime_field_overflow",
        "22012" => "division_by_zero",
        "22023" => "invalid_parameter_value",
        "22P02" => "invalid_text_representation",
        "22P05" => "untranslatable_character",
        "23000" => "integrity_constraint_violation",
        "23001" => "restrict_violation",
        "23502" => "not_null_violation",
        "23503" => "foreign_key_violation",
        "23505" => "unique_violation",
        "23514" => "check_violation",
        "23P01" => "exclusion_violation",
        "24000" => "invalid_cursor_state",
        "25000" => "invalid_transaction_state",
        "25001" => "active_sql_transaction",
        "25006" => "read_only_sql_transaction",
        "25P01" => "no_active_sql_transaction",
        "25P02" => "in_failed_sql_transaction",
        "25P03" => "idle_in_transaction_session_timeout",
        "26000" => "invalid_sql_statement_name",
        "28000" => "invalid_authorization_specification",
        "28P01" => "invalid_password",
        "2BP01" => "dependent_objects_still_exist",
        "34000" => "invalid_cursor_name",
        "3D000" => "invalid_catalog_name",
        "3F000" => "invalid_schema_name",
        "40000" => "transaction_rollback",
        "40001" => "serialization_failure",
        "40002" => "transaction_integrity_constraint_violation",
        "40003" => "statement_completion_unknown",
        "40P01" => "deadlock_detected",
        "42000" => "syntax_error_or_access_rule_violation",
        "42501" => "insufficient_privilege",
        "42601" => "syntax_error",
        "42602" => "invalid_name",
        "42622" => "name_too_long",
        "42702" => "ambiguous_column",
        "42703" => "undefined_column",
        "42704" => "undefined_object",
        "42710" => "duplicate_object",
        "42712" => "duplicate_alias",
        "42723" => "duplicate_function",
        "42725" => "ambiguous_function",
        "42803" => "grouping_error",
        "42804" => "datatype_mismatch",
        "42809" => "wrong_object_type",
        "42830" => "invalid_foreign_key",
        "42846" => "cannot_coerce",
        "42883" => "undefined_function",
        "42P01" => "undefined_table",
        "42P02" => "undefined_parameter",
        "42P03" => "duplicate_cursor",
        "42P04" => "duplicate_database",
        "42P05" => "duplicate_prepared_statement",
        "42P06" => "duplicate_schema",
        "42P07" => "duplicate_table",
        "42P18" => "indeterminate_datatype",
        "53000" => "insufficient_resources",
        "53100" => "disk_full",
        "53200" => "out_of_memory",
        "53300" => "too_many_connections",
        "54000" => "program_limit_exceeded",
        "55000" => "object_not_in_prerequisite_state",
        "55006" => "object_in_use",
        "55P03" => "lock_not_available",
        "57000" => "operator_intervention",
        "57014" => "query_canceled",
        "57P01" => "admin_shutdown",
        "57P02" => "crash_shutdown",
        "57P03" => "cannot_connect_now",
        "57P04" => "database_dropped",
        "57P05" => "idle_session_timeout",
        "58000" => "system_error",
        "58030" => "io_error",
        "XX000" => "internal_error",
        "XX001" => "data_corrupted",
        "XX002" => "index_corrupted",
        _ => "",
    };
    if !exact.is_empty() {
        return Some(exact);
    }
    Some(match sqlstate.get(..2)? {
        "01" => "warning",
        "02" => "no_data",
        "03" => "sql_statement_not_yet_complete",
        "08" => "connection_exception",
        "09" => "triggered_action_exception",
        "0A" => "feature_not_supported",
        "0B" => "invalid_transaction_initiation",
        "0F" => "locator_exception",
        "0L" => "invalid_grantor",
        "0P" => "invalid_role_specification",
        "0Z" => "diagnostics_exception",
        "20" => "case_not_found",
        "21" => "cardinality_violation",
        "22" => "data_exception",
        "23" => "integrity_constraint_violation",
        "24" => "invalid_cursor_state",
        "25" => "invalid_transaction_state",
        "26" => "invalid_sql_statement_name",
        "27" => "triggered_data_change_violation",
        "28" => "invalid_authorization_specification",
        "2B" => "dependent_privilege_descriptors_still_exist",
        "2D" => "invalid_transaction_termination",
        "2F" => "sql_routine_exception",
        "34" => "invalid_cursor_name",
        "38" => "external_routine_exception",
        "39" => "external_routine_invocation_exception",
        "3B" => "savepoint_exception",
        "3D" => "invalid_catalog_name",
        "3F" => "invalid_schema_name",
        "40" => "transaction_rollback",
        "42" => "syntax_error_or_access_rule_violation",
        "44" => "with_check_option_violation",
        "53" => "insufficient_resources",
        "54" => "program_limit_exceeded",
        "55" => "object_not_in_prerequisite_state",
        "57" => "operator_intervention",
        "58" => "system_error",
        "72" => "snapshot_too_old",
        "F0" => "config_file_error",
        "HV" => "fdw_error",
        "P0" => "plpgsql_error",
        "XX" => "internal_error",
        _ => return None,
    })
}

/// The server error name of a MySQL/MariaDB error number, for the errors clients
/// meet most.
pub fn mysql(code: &str) -> Option<&'static str> {
    Some(match code.parse::<u16>().ok()? {
        1005 => "ER_CANT_CREATE_TABLE",
        1007 => "ER_DB_CREATE_EXISTS",
        1008 => "ER_DB_DROP_EXISTS",
        1040 => "ER_CON_COUNT_ERROR",
        1044 => "ER_DBACCESS_DENIED_ERROR",
        1045 => "ER_ACCESS_DENIED_ERROR",
        1046 => "ER_NO_DB_ERROR",
        1048 => "ER_BAD_NULL_ERROR",
        1049 => "ER_BAD_DB_ERROR",
        1050 => "ER_TABLE_EXISTS_ERROR",
        1051 => "ER_BAD_TABLE_ERROR",
        1052 => "ER_NON_UNIQ_ERROR",
        1054 => "ER_BAD_FIELD_ERROR",
        1060 => "ER_DUP_FIELDNAME",
        1061 => "ER_DUP_KEYNAME",
        1062 => "ER_DUP_ENTRY",
        1064 => "ER_PARSE_ERROR",
        1065 => "ER_EMPTY_QUERY",
        1091 => "ER_CANT_DROP_FIELD_OR_KEY",
        1136 => "ER_WRONG_VALUE_COUNT_ON_ROW",
        1142 => "ER_TABLEACCESS_DENIED_ERROR",
        1143 => "ER_COLUMNACCESS_DENIED_ERROR",
        1146 => "ER_NO_SUCH_TABLE",
        1149 => "ER_SYNTAX_ERROR",
        1205 => "ER_LOCK_WAIT_TIMEOUT",
        1213 => "ER_LOCK_DEADLOCK",
        1216 => "ER_NO_REFERENCED_ROW",
        1217 => "ER_ROW_IS_REFERENCED",
        1243 => "ER_UNKNOWN_STMT_HANDLER",
        1264 => "ER_WARN_DATA_OUT_OF_RANGE",
        1292 => "ER_TRUNCATED_WRONG_VALUE",
        1305 => "ER_SP_DOES_NOT_EXIST",
        1317 => "ER_QUERY_INTERRUPTED",
        1364 => "ER_NO_DEFAULT_FOR_FIELD",
        1366 => "ER_TRUNCATED_WRONG_VALUE_FOR_FIELD",
        1406 => "ER_DATA_TOO_LONG",
        1451 => "ER_ROW_IS_REFERENCED_2",
        1452 => "ER_NO_REFERENCED_ROW_2",
        1690 => "ER_DATA_OUT_OF_RANGE",
        1698 => "ER_ACCESS_DENIED_NO_PASSWORD_ERROR",
        1792 => "ER_CANT_EXECUTE_IN_READ_ONLY_TRANSACTION",
        1927 => "ER_CONNECTION_KILLED",
        3024 => "ER_QUERY_TIMEOUT",
        3572 => "ER_LOCK_NOWAIT",
        4031 => "ER_CLIENT_INTERACTION_TIMEOUT",
        _ => return None,
    })
}

/// A Redis error's prefix with the server's fixed text for it, or the prefix alone
/// where the server's text carries arguments (`ERR unknown command 'x'…`).
pub fn redis(prefix: &str) -> Option<&'static str> {
    Some(match prefix {
        "ERR" => "ERR",
        "WRONGTYPE" => "WRONGTYPE Operation against a key holding the wrong kind of value",
        "NOAUTH" => "NOAUTH Authentication required",
        "WRONGPASS" => "WRONGPASS invalid username-password pair or user is disabled",
        "NOPERM" => "NOPERM",
        "OOM" => "OOM command not allowed when used memory > 'maxmemory'",
        "BUSY" => "BUSY Redis is busy running a script",
        "NOSCRIPT" => "NOSCRIPT No matching script",
        "LOADING" => "LOADING Redis is loading the dataset in memory",
        "READONLY" => "READONLY You can't write against a read only replica",
        "MASTERDOWN" => "MASTERDOWN Link with MASTER is down",
        "MISCONF" => "MISCONF",
        "EXECABORT" => "EXECABORT Transaction discarded because of previous errors",
        "NOREPLICAS" => "NOREPLICAS Not enough good replicas to write",
        "BUSYGROUP" => "BUSYGROUP Consumer Group name already exists",
        "NOGROUP" => "NOGROUP",
        "MOVED" => "MOVED",
        "ASK" => "ASK",
        "TRYAGAIN" => "TRYAGAIN",
        "CLUSTERDOWN" => "CLUSTERDOWN",
        "CROSSSLOT" => "CROSSSLOT Keys in request don't hash to the same slot",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptions_come_from_codes_only() {
        assert_eq!(http(404), Some("Not Found"));
        assert_eq!(http(599), None);
        assert_eq!(postgres("42P01"), Some("undefined_table"));
        assert_eq!(postgres("22012"), Some("division_by_zero"));
        // An unlisted code of a known class: the class.
        assert_eq!(postgres("23999"), Some("integrity_constraint_violation"));
        assert_eq!(postgres("Q"), None);
        assert_eq!(mysql("1146"), Some("ER_NO_SUCH_TABLE"));
        assert_eq!(mysql("65535"), None);
        assert_eq!(mysql("abc"), None);
        assert_eq!(
            redis("WRONGTYPE"),
            Some("WRONGTYPE Operation against a key holding the wrong kind of value")
        );
        assert_eq!(redis("ERR"), Some("ERR"));
        assert_eq!(redis("SOMETHING"), None);
    }
}
