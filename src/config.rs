//! TEMPORARY placeholder (lead): replaced by the full configuration module.
#[derive(Debug, Clone)]
pub struct MappingConfig {
    pub id_column: String,
    pub key_column: String,
    pub route_column: String,
    pub payload_column: String,
    pub type_column: Option<String>,
    pub topic_template: String,
    pub topic: Option<String>,
    pub header_columns: Vec<String>,
    pub provenance_headers: bool,
}
impl Default for MappingConfig {
    fn default() -> Self {
        MappingConfig {
            id_column: "id".into(),
            key_column: "aggregateid".into(),
            route_column: "aggregatetype".into(),
            payload_column: "payload".into(),
            type_column: Some("type".into()),
            topic_template: "outbox.event.${routedByValue}".into(),
            topic: None,
            header_columns: vec![],
            provenance_headers: true,
        }
    }
}
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableName {
    pub schema: String,
    pub name: String,
}
